"""`AdapterFiles`: one PEFT adapter folder as bytes, the form adapters travel in on the serving side.

A generator backend returns it, the Ray actor sends it, the store publishes it. It is the folder
vLLM loads (``adapter_config.json`` and ``adapter_model.safetensors``), file name -> content;
nothing here imports torch (the generator package makes these bytes with
``LoRAAdapter.to_peft_files()``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

AdapterFiles = dict[str, bytes]  # file name -> content of one PEFT adapter folder

ADAPTER_CONFIG = "adapter_config.json"  # the file that makes a folder a PEFT adapter

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # plain names: never a path


def check_adapter_files(files: Mapping[str, bytes], reserved: Collection[str] = ()) -> AdapterFiles:
    """``files`` as `AdapterFiles` after checking them; ValueError / TypeError naming the problem.

    Names must be plain file names (no folders, no leading dot) and not in ``reserved``;
    contents must be bytes-like; ``adapter_config.json`` must be among them.
    """
    if not files:
        raise ValueError("an adapter needs at least one file")
    out: AdapterFiles = {}
    for name, data in files.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name) or name in reserved:
            raise ValueError(f"not an allowed adapter file name: {name!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"adapter file {name!r} must be bytes, got {type(data).__name__}")
        out[name] = bytes(data)
    if ADAPTER_CONFIG not in out:
        raise ValueError(f"a PEFT adapter needs {ADAPTER_CONFIG}")
    return out
