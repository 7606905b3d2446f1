"""Nothing in the sources loads weights unsafely, checked by meaning on the syntax tree (not by
spelling): imports and their aliases are resolved, keyword arguments passed through ``**kwargs``
are traced to the dict they were built from, and whitespace or line breaks change nothing.

The rules, each a finding when broken:
- no pickle-family module (pickle, dill, joblib, marshal, shelve, ...) is imported, in any form;
- ``torch.load`` only as a direct call with ``weights_only=True``; ``torch.jit.load``, ``torch.hub.load``,
  ``from_single_file`` (reads .ckpt pickles) never; ``numpy.load`` never with ``allow_pickle``;
- every ``from_pretrained`` of something with weights (not a tokenizer, scheduler, config or
  processor class) and every ``load_lora_weights`` / ``lora_state_dict`` / ``load_textual_inversion`` /
  ``load_ip_adapter`` / ``load_attn_procs`` passes ``use_safetensors=True``;
- no ``trust_remote_code`` other than False, no ``use_safetensors=False``, no ``weights_only=False``.
At run time, a resume reads accelerate's optimizer, scheduler and RNG state with ``weights_only=True``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from helpers import DEMO_IMAGES, ROOT
from helpers.training import LORA_FILE, run_inprocess, tiny_args

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "pickletools",
                  "torch.package"}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
NEVER = {"torch.jit.load": "torch.jit.load", "torch.hub.load": "torch.hub.load",
         "torch.hub.load_state_dict_from_url": "torch.hub.load_state_dict_from_url"}
NEEDS_SAFETENSORS = {"from_pretrained", "load_lora_weights", "lora_state_dict", "load_textual_inversion", "load_ip_adapter",
                     "load_attn_procs"}
WITHOUT_WEIGHTS = re.compile(r"(Tokenizer|TokenizerFast|Scheduler|Config|Processor|FeatureExtractor)$")


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _pickle_module(name: str | None) -> bool:
    return bool(name) and any(name == m or name.startswith(m + ".") for m in PICKLE_MODULES)


class _Scan:
    """One source file's findings."""

    def __init__(self, source: str):
        self.tree = ast.parse(source)
        self.parents = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.aliases: dict[str, set[str]] = {}
        self.found: list[str] = []
        self.checked_loads = 0
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _pickle_module(a.name):
                        self.found.append(f"import {a.name}")
                    local = a.asname or a.name.split(".")[0]
                    self.aliases.setdefault(local, set()).add(a.name if a.asname else a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    qualified = f"{node.module}.{a.name}"
                    if _pickle_module(node.module) or _pickle_module(qualified):
                        self.found.append(f"from {node.module} import {a.name}")
                    self.aliases.setdefault(a.asname or a.name, set()).add(qualified)

    # ------------------------------------------------------------------ names

    def qualified(self, node) -> set[str]:
        """What an expression names, through the imports: ``th.load`` with ``import torch as th`` -> torch.load."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, {node.id})
        if isinstance(node, ast.Attribute):
            return {f"{q}.{node.attr}" for q in self.qualified(node.value)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            return {f"{q}.{node.args[1].value}" for q in self.qualified(node.args[0])}
        return set()

    # ------------------------------------------------------------------ **kwargs traced to their dict

    def _scope(self, node):
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return node
        return self.tree

    def _assignments(self, name: str, scope) -> list | None:
        """The values assigned to ``name`` in ``scope``; None when it is changed in a way that cannot be followed."""
        values = []
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id == name:
                        values.append(node.value)
                    elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id == name:
                        key = target.slice
                        if not isinstance(key, ast.Constant) or key.value == "use_safetensors":
                            return None
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name) \
                    and node.target.id == name:
                return None
            elif isinstance(node, ast.Delete) and any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                                                      and t.value.id == name for t in node.targets):
                return None
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == name and node.func.attr in ("update", "pop", "setdefault", "clear", "popitem"):
                return None
        return values

    def _dict_sets(self, node, scope, key: str, depth: int = 0) -> bool:
        """Whether the mapping ``node`` evaluates to surely holds ``key=True``."""
        if depth > 8:
            return False
        if isinstance(node, ast.IfExp):
            return self._dict_sets(node.body, scope, key, depth + 1) and self._dict_sets(node.orelse, scope, key, depth + 1)
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if k is None and self._dict_sets(v, scope, key, depth + 1):
                    return True
                if isinstance(k, ast.Constant) and k.value == key:
                    return _is_const(v, True)
            return False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            for kw in node.keywords:
                if kw.arg == key:
                    return _is_const(kw.value, True)
            return any(self._dict_sets(a, scope, key, depth + 1) for a in node.args) or \
                any(kw.arg is None and self._dict_sets(kw.value, scope, key, depth + 1) for kw in node.keywords)
        if isinstance(node, ast.Name):
            values = self._assignments(node.id, scope)
            return bool(values) and all(self._dict_sets(v, scope, key, depth + 1) for v in values)
        return False

    def passes_true(self, call: ast.Call, key: str) -> bool:
        """Whether the call surely passes ``key=True`` (as a keyword, or in a ``**mapping`` traced to its dict)."""
        explicit = [kw for kw in call.keywords if kw.arg == key]
        if explicit:
            return _is_const(explicit[-1].value, True)
        scope = self._scope(call)
        return any(kw.arg is None and self._dict_sets(kw.value, scope, key) for kw in call.keywords)

    # ------------------------------------------------------------------ the rules

    def run(self) -> list[str]:
        direct_calls = set()
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            names = self.qualified(node.func)
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not _is_const(kw.value, False):
                    self.found.append("trust_remote_code")
                if kw.arg in ("use_safetensors", "weights_only") and _is_const(kw.value, False):
                    self.found.append(f"{kw.arg}=False")
            if names & TORCH_LOAD:
                direct_calls.add(node.func)
                self.checked_loads += 1
                if not self.passes_true(node, "weights_only"):
                    self.found.append("torch.load without weights_only=True")
            for name in names & NEVER.keys():
                self.found.append(NEVER[name])
            if "numpy.load" in names:
                direct_calls.add(node.func)
                if any(kw.arg == "allow_pickle" and not _is_const(kw.value, False) for kw in node.keywords) or \
                        any(kw.arg is None for kw in node.keywords):
                    self.found.append("numpy.load with allow_pickle")
            if names & {"__import__", "importlib.import_module"} and node.args and isinstance(node.args[0], ast.Constant) \
                    and _pickle_module(str(node.args[0].value)):
                self.found.append(f"import {node.args[0].value}")
            if isinstance(node.func, ast.Attribute):
                method = node.func.attr
                if method == "from_single_file":
                    self.found.append("from_single_file")
                if method in NEEDS_SAFETENSORS:
                    receiver = node.func.value
                    owner = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
                    if method == "from_pretrained" and WITHOUT_WEIGHTS.search(owner or ""):
                        continue
                    self.checked_loads += 1
                    if not self.passes_true(node, "use_safetensors"):
                        self.found.append(f"{method} without use_safetensors=True")
        # torch.load / numpy.load handed around instead of called: its arguments cannot be checked
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.Name, ast.Attribute)) and node not in direct_calls \
                    and self.qualified(node) & (TORCH_LOAD | {"numpy.load"}) and not isinstance(self.parents.get(node), ast.Attribute):
                self.found.append(f"{'.'.join(sorted(self.qualified(node) & (TORCH_LOAD | {'numpy.load'})))} used as a value")
        return self.found


def unsafe_uses(source: str) -> list[str]:
    return _Scan(source).run()


UNSAFE = {
    "from torch import load\nsd = load(f)": "torch.load without weights_only=True",
    "from torch.serialization import load as read\nsd = read(f, map_location='cpu')": "torch.load without weights_only=True",
    "import torch\nsd = torch.load (f)": "torch.load without weights_only=True",
    "import torch\nsd = torch.load(\n    f,\n    map_location=dict(a=1),\n)": "torch.load without weights_only=True",
    "import torch as th\nsd = th.load(f, weights_only=False)": "torch.load without weights_only=True",
    "import torch\nsd = getattr(torch, 'load')(f)": "torch.load without weights_only=True",
    "import torch\nread = torch.load\nsd = read(f, weights_only=True)": "torch.load used as a value",
    "import pickle as pk\nobj = pk.load(fh)": "import pickle",
    "import pickle\nobj = pickle.Unpickler(fh).load()": "import pickle",
    "from pickle import loads\nobj = loads(b)": "from pickle import loads",
    "def f(b):\n    import dill\n    return dill.loads(b)": "import dill",
    "import importlib\nm = importlib.import_module('pickle')": "import pickle",
    "import numpy as np\na = np.load(f, allow_pickle=True)": "numpy.load with allow_pickle",
    "import torch\nm = torch.jit.load(f)": "torch.jit.load",
    "from diffusers import UNet2DConditionModel\nu = UNet2DConditionModel.from_pretrained(path)":
        "from_pretrained without use_safetensors=True",
    "def f(path):\n    kw = dict(variant='fp16')\n    return CLIPTextModel.from_pretrained(path, **kw)":
        "from_pretrained without use_safetensors=True",
    "def f(path, flag):\n    return cls.from_pretrained(path, use_safetensors=flag)": "from_pretrained without use_safetensors=True",
    "def f(path):\n    kw = dict(use_safetensors=True)\n    kw['use_safetensors'] = False\n    return Unet.from_pretrained(path, **kw)":
        "from_pretrained without use_safetensors=True",
    "pipe.load_lora_weights(path)": "load_lora_weights without use_safetensors=True",
    "pipe.load_lora_weights(path, use_safetensors=False)": "use_safetensors=False",
    "pipe = StableDiffusionXLPipeline.from_single_file('model.ckpt', use_safetensors=True)": "from_single_file",
    "m = AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=True)": "trust_remote_code",
}

SAFE = [
    "import torch\nsd = torch.load(f, map_location='cpu', weights_only=True)",
    "import numpy as np\na = np.load(f)\nb = np.load(g, allow_pickle=False)",
    "from transformers import AutoTokenizer, CLIPTokenizer\nt = CLIPTokenizer.from_pretrained(p)\nu = AutoTokenizer.from_pretrained(p)",
    "from diffusers import DDPMScheduler\ns = DDPMScheduler.from_pretrained(p, subfolder='scheduler')",
    "def f(p, v):\n    common = dict(revision=None)\n    weights = dict(common, variant=v, use_safetensors=True)\n"
    "    extra = {**weights, 'subfolder': 'vae'} if v else {'pretrained_model_name_or_path': p, **weights}\n"
    "    return UNet.from_pretrained(p, **weights), Vae.from_pretrained(**extra)",
    "pipe.load_lora_weights(state, use_safetensors=True)",
    "from safetensors.torch import load_file\nsd = load_file(p)",
    "m = type(model).from_pretrained(d, use_safetensors=True)",
]


@pytest.mark.parametrize("source, finding", list(UNSAFE.items()), ids=[f"unsafe{i}" for i in range(len(UNSAFE))])
def test_the_scan_finds_each_spelling_of_unsafe_loading(source, finding):
    assert finding in unsafe_uses(source), source


@pytest.mark.parametrize("source", SAFE, ids=[f"safe{i}" for i in range(len(SAFE))])
def test_the_scan_accepts_safe_loading(source):
    assert unsafe_uses(source) == []


def _sources() -> list[Path]:
    return sorted((ROOT / "sdxl_ambient").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")) + \
        [ROOT / "train_sdxl_ambient.py"]


def test_sources_load_weights_safely():
    found, checked = {}, 0
    for path in _sources():
        scan = _Scan(path.read_text())
        if scan.run():
            found[str(path.relative_to(ROOT))] = scan.found
        checked += scan.checked_loads
    assert found == {}
    # the scan reached the loading calls: the SDXL parts, the VAE, the embedders, the pipeline, both LoRA loads
    assert checked >= 10, checked


def test_a_resume_reads_training_state_with_weights_only(monkeypatch, tmp_path, tiny_pipeline_dir):
    """accelerate's optimizer, scheduler and RNG state are torch pickles: a resume must read each with
    weights_only=True (accelerate's default, which no keyword of ours may turn off)."""
    out = tmp_path / "out"
    args = tiny_args(tiny_pipeline_dir, DEMO_IMAGES, out, steps=4)  # a checkpoint at step 3
    assert run_inprocess(args) == 0
    for name in (LORA_FILE, "pytorch_lora_weights_kohya.safetensors", "README.md"):  # as if killed after step 3
        (out / name).unlink()
    calls, real = [], torch.load

    def recording(f, *args, **kwargs):
        calls.append((Path(str(f)).name, kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    assert run_inprocess(args + ["--resume_from_checkpoint", "latest"]) == 0
    read = {name for name, _ in calls}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= read, calls
    assert all(weights_only is True for _, weights_only in calls), calls
    assert (out / LORA_FILE).is_file()
