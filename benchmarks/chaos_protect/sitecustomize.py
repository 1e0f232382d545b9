"""Put ckptguard into ckpt-chaos's own Hugging Face Trainer bench, without touching it.

``benchmarks/crash_table.py`` runs ``ckpt-chaos bench hf_trainer`` twice: as shipped (the
unprotected baseline) and with this directory in front of PYTHONPATH (through ckpt-chaos's
``CKPT_CHAOS_PREPEND_PYTHONPATH``). Python then imports this ``sitecustomize`` instead of
ckpt-chaos's fault injector, so this one first runs that injector, then calls
``ckptguard.integrations.transformers.install()``: the one line a user adds.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _run_next_sitecustomize() -> None:
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == _HERE:
            continue
        candidate = os.path.join(entry or os.curdir, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_next_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            return


_run_next_sitecustomize()

from ckptguard.integrations.transformers import install  # noqa: E402 - after the injector

install()
