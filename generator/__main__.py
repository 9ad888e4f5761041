"""Command line: train a generator, generate an adapter, import Super-NaturalInstructions tasks.

    python -m generator train --kind loragen|t2l --library DIR --out CKPT [--steps N] [--resume]
    python -m generator generate --checkpoint CKPT --description TEXT [--seed N] --out DIR
    python -m generator import-sni --natural-instructions DIR --t2l DIR --tasks LIST --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arg_types import count, device, empty_folder, number
from .config import TrainConfig


def _train(args: argparse.Namespace) -> int:
    import torch

    from .training.train import train

    torch.set_num_threads(max(1, args.threads))
    configs: dict = {}
    if args.model_config:
        configs = json.loads(Path(args.model_config).read_text())
        unknown = set(configs) - {"lae", "diffusion", "t2l"}
        if unknown:
            raise ValueError(f"--model-config: unknown sections {sorted(unknown)} (use lae, diffusion, t2l)")
    defaults = TrainConfig()
    cfg = TrainConfig(
        steps=args.steps if args.steps is not None else defaults.steps,
        diffusion_steps=args.diffusion_steps if args.diffusion_steps is not None else defaults.diffusion_steps,
        batch_size=args.batch_size, tokens_per_step=args.tokens_per_step, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, num_threads=args.threads,
    )
    only = None
    if args.tasks_file:
        only = [n.strip() for n in Path(args.tasks_file).read_text().splitlines() if n.strip() and not n.startswith("#")]
    _refuse_evaluation_tasks(args.library, only, args.splits)
    gen = train(args.kind, args.library, args.out, cfg, configs, resume=args.resume, progress=not args.no_progress,
                device=args.device, max_descriptions=args.max_descriptions, only=only, snapshots=args.snapshots)
    print(json.dumps({"checkpoint": str(Path(args.out).resolve()), "kind": gen.kind,
                      "fingerprint": gen.fingerprint, "parameters": gen.num_parameters}))
    return 0


def _refuse_evaluation_tasks(library: str, only: list[str] | None, splits_file: str) -> None:
    """ValueError if the library tasks to train on include a validation or test task of the splits
    file (where it exists): an evaluation task's oracle is for scoring, never for training."""
    from .data.library import task_folders
    from .data.sni import load_splits

    if not Path(splits_file).is_file():
        return
    names = set(only) if only is not None else {f.name for f in task_folders(library)}
    held_out = sorted(names & set(load_splits(splits_file).evaluation))
    if held_out:
        raise ValueError(f"{len(held_out)} library tasks are validation or test tasks of {splits_file}, never "
                         f"trained on: {held_out[:3]} (the oracles' held_out/ folder is not a library to train on)")


def _generate(args: argparse.Namespace) -> int:
    from .api import Generator

    gen = Generator.load(args.checkpoint, device=args.device)
    adapters, timings = gen.generate_timed([args.description], seed=args.seed, steps=args.steps, guidance=args.guidance)
    out = adapters[0].save_peft(args.out, base_model_name_or_path=args.base_model_path)
    print(json.dumps({"adapter": str(out.resolve()), "fingerprint": gen.fingerprint, "seed": args.seed,
                      "seconds": {k: round(v, 6) for k, v in timings.items()}}))
    return 0


def _import_sni(args: argparse.Namespace) -> int:
    from .data.sni_import import import_tasks, read_task_list

    report = import_tasks(args.natural_instructions, args.t2l, read_task_list(args.tasks), args.out,
                          max_instances=args.max_instances, overwrite=args.overwrite, progress=not args.no_progress)
    for name, why in report.failed.items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    print(json.dumps({"written": len(report.written), "kept": len(report.kept), "failed": len(report.failed),
                      "instances": sum(report.instances.values()), "out": str(Path(args.out).resolve())}))
    return 1 if report.failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m generator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a generator on a LoRA library folder")
    t.add_argument("--kind", choices=["loragen", "t2l"], required=True)
    t.add_argument("--library", required=True, help="folder with one sub-folder per task (PEFT adapter + descriptions.json)")
    t.add_argument("--out", required=True, help="checkpoint folder to write")
    t.add_argument("--steps", type=count(1), help="LAE steps (loragen) or hypernetwork steps (t2l)")
    t.add_argument("--diffusion-steps", type=count(1), help="denoiser training steps (loragen)")
    t.add_argument("--batch-size", type=count(1), default=TrainConfig.batch_size)
    t.add_argument("--tokens-per-step", type=count(1), default=TrainConfig.tokens_per_step,
                   help="LAE locations per module per step (loragen)")
    t.add_argument("--lr", type=number(0.0, 1.0, above=True), default=TrainConfig.lr)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=count(1), default=TrainConfig.checkpoint_every,
                   help="steps between training-state checkpoints (for --resume)")
    t.add_argument("--threads", type=count(1), default=1, help="torch CPU threads")
    t.add_argument("--device", type=device, default="cpu", help="torch device to train on (cpu, cuda)")
    t.add_argument("--max-descriptions", type=count(1), help="use the first N descriptions of each task")
    t.add_argument("--tasks-file", help="train on the library's tasks named in this file (one a line)")
    t.add_argument("--splits", default=str(Path(__file__).resolve().parents[1] / "data" / "sni" / "splits.json"),
                   help="splits file whose validation and test tasks are refused as training tasks (if it exists)")
    t.add_argument("--snapshots", type=count(1), nargs="*", default=[],
                   help="loragen: denoiser steps at which to also write <out>/snapshots/dit-<step>/")
    t.add_argument("--model-config", help='JSON file {"lae": {...}, "diffusion": {...}, "t2l": {...}}')
    t.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt if present")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="generate a PEFT adapter folder for one description")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--description", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, type=empty_folder, help="adapter folder to write (new or empty)")
    g.add_argument("--steps", type=int, help="sampler steps (loragen; default from the checkpoint)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (loragen)")
    g.add_argument("--device", type=device, default="cpu")
    g.add_argument("--base-model-path", help="base_model_name_or_path to write (default: the checkpoint's base model)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("import-sni", help="build or extend a task library from natural-instructions + text-to-lora copies")
    s.add_argument("--natural-instructions", required=True, help="copy of allenai/natural-instructions (tasks/<name>.json)")
    s.add_argument("--t2l", required=True, help="copy of SakanaAI/text-to-lora (tasks/lol_*/metadata.yaml)")
    s.add_argument("--tasks", required=True, help="file of task names, one a line")
    s.add_argument("--out", required=True, help="task folder to write (e.g. data/sni/tasks)")
    s.add_argument("--max-instances", type=count(1), default=200, help="first N distinct instances of each task")
    s.add_argument("--overwrite", action="store_true", help="replace task files that exist")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_import_sni)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError) as e:  # bad input: paths, files, folders, settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (use --resume to continue training)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
