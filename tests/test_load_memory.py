"""Peak memory of loading a FiPS directory without the dense model.

A synthetic Llama of 1.07 B dense parameters (d 1024, h 16384, 20 blocks; 1.01 B of them in the MLPs) is
written without ever existing densely: the architecture is built under ``fips_kernels.empty_weights``, the
attention and embedding weights are drawn, and the MLPs get FiPS layers made directly (groups of 4 blocks,
rank 128, 1:8 factors): a 0.3 GiB directory instead of 4 GiB of fp32 MLP weights. Each load route then
runs in a fresh process, which measures its peak resident memory (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after the imports and a warm-up load; without the reset the peak of the imports
counts too, which can only make the test stricter) while it loads the directory and reads every tensor
once. Bound (issue 15): the compressed checkpoint's size + the non-MLP weights + 10 %.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fips_kernels as fk

import compress_models as cm

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

MiB = 2 ** 20
CONFIG = dict(vocab_size=8000, hidden_size=1024, intermediate_size=16384, num_hidden_layers=20,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
RANK, GROUP = 128, 4

MEASURE = r"""
import json, sys
route, big, warm = sys.argv[1:4]
import torch, transformers, fips_kernels as fk
from transformers import AutoConfig, AutoModel, LlamaModel
torch.set_num_threads(1)

def load(d):
    if route == "fk.load":
        config = AutoConfig.from_pretrained(d)
        return fk.load(d, lambda: LlamaModel(config))
    return AutoModel.from_pretrained(d)

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

load(warm)  # imports what a load imports, so the peak below is the load's own
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    reset = True
except OSError:
    reset = False
before = status()
model = load(big)
for t in model.state_dict().values():  # every tensor read once (mmap-backed tensors count from here)
    int(t.reshape(-1).view(torch.uint8)[:: 4096].sum())
after = status()
layers = sum(isinstance(m, fk.FiPSLinear) for m in model.modules())
with torch.no_grad():
    y = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
print(json.dumps({"before": before["VmRSS"], "peak": after["VmHWM"], "reset": reset, "fips_layers": layers,
                  "meta": fk.meta.meta_tensors(model)[:3], "finite": bool(torch.isfinite(y).all())}))
"""


def _available(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _nm_factor(K: int, N: int, g: torch.Generator):
    """A random 1:8 factor (K, N): one value in every 8 rows of each column."""
    from fips_kernels.formats import SparseFactor

    values = torch.randn(K // 8, 1, N, generator=g) * 0.05
    where = torch.randint(0, 8, (K // 8, 1, N), generator=g)
    dense = torch.zeros(K // 8, 8, N).scatter_(1, where, values).reshape(K, N)
    return SparseFactor.pack(dense, "nm", n=1, m=8)


def build_synthetic_llama(directory) -> dict:
    """Write the synthetic Llama's FiPS directory; returns its sizes in bytes."""
    from fips_kernels.modules import FiPSGroup, FiPSLinear, SharedBase, install

    config = transformers.LlamaConfig(**CONFIG)
    with fk.empty_weights():
        model = transformers.LlamaModel(config)
    dense = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        if ".mlp." in name:
            continue  # replaced below, never allocated
        owner, _, leaf = name.rpartition(".")
        value = torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape)
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value)
    non_mlp = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." not in n)
    d, h = config.hidden_size, config.intermediate_size
    for first in range(0, config.num_hidden_layers, GROUP):
        base = SharedBase(torch.randn(d, RANK, generator=g) / math.sqrt(d))
        layers, names = [], []
        for b in range(first, first + GROUP):
            for proj, kind in (("gate_proj", "expand"), ("up_proj", "expand"), ("down_proj", "contract")):
                shape = (RANK, h) if kind == "expand" else (h, RANK)
                layers.append(FiPSLinear(base, _nm_factor(*shape, g), kind))
                names.append(f"layers.{b}.mlp.{proj}")
        install(model, FiPSGroup(base, layers), names)
    assert not fk.meta.meta_tensors(model)
    fk.save_pretrained(model, directory)
    return {"dense_parameters": dense, "non_mlp": non_mlp,
            "file": os.path.getsize(os.path.join(directory, "model.safetensors"))}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("measures VmHWM in /proc (Linux)")
    root = tmp_path_factory.mktemp("load-memory")
    if _available("MemAvailable") < 3 * 2 ** 30:
        pytest.skip("needs 3 GiB of free memory (two loads of 0.6 GiB at once, and the builder)")
    if shutil.disk_usage(root).free < 2 * 2 ** 30:
        pytest.skip("needs 2 GiB of free disk for the 0.3 GiB directory")
    torch.manual_seed(0)
    warm = root / "warm"
    fk.save_pretrained(fk.compress(cm.tiny_llama(layers=2).model, calib_data=cm.token_batches(), group_size=2,
                                   steps=0, progress=False)[0], warm)
    sizes = build_synthetic_llama(root / "big")
    yield root / "big", warm, sizes
    shutil.rmtree(root, ignore_errors=True)  # 0.3 GiB: not left for pytest's last three runs


def test_peak_memory_of_a_load_is_within_the_compressed_size(directories):
    big, warm, sizes = directories
    assert 0.95e9 < sizes["dense_parameters"] < 1.2e9  # the ~1 B model the issue asks for
    bound = 1.10 * (sizes["file"] + sizes["non_mlp"])
    # the reference backend: conftest turns on the Triton interpreter, far too slow for a 1 B forward
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", FIPS_KERNELS_BACKEND="reference", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error")
    procs = {route: subprocess.Popen([sys.executable, "-c", MEASURE, route, str(big), str(warm)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for route in ("fk.load", "AutoModel")}
    try:
        results = {route: proc.communicate(timeout=240) for route, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for route, (out, err) in results.items():
        assert procs[route].returncode == 0, err[-2000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["fips_layers"] == 60 and not got["meta"] and got["finite"]
        used = got["peak"] - got["before"]
        print(f"{route}: peak {used / MiB:.0f} MiB over the {got['before'] / MiB:.0f} MiB after imports "
              f"(VmHWM reset: {got['reset']}); checkpoint {sizes['file'] / MiB:.0f} MiB, non-MLP weights "
              f"{sizes['non_mlp'] / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB; dense fp32 model "
              f"{sizes['dense_parameters'] * 4 / MiB:.0f} MiB")
        assert used <= bound, f"{route}: loading took {used / MiB:.0f} MiB, more than {bound / MiB:.0f} MiB"
