"""Weight bytes and host memory of loading 4-bit SVDQuant transformers against their 16-bit originals.

    python benchmarks/load_memory.py                       # sizes of both models; loads at FLUX.1-dev geometry
    python benchmarks/load_memory.py --blocks 19,38 --blocks-16bit 4,8 --out outputs/bench/load_memory.json
    python benchmarks/load_memory.py --quick               # 1 double + 1 single block per load: checks the script

Why: a 4-bit run exists to hold a quarter of the 16-bit transformer, and that is lost if loading holds the
file twice over (a memory map plus the tensors made from it) or reads the 16-bit weights first.

Part 1, sizes (meta device, no data): for FLUX.1-dev and Qwen-Image at full size, the bytes of the bf16
transformer's parameters against the tensors of an int4 r32, int4 r128 and nvfp4 r32 file (`file_layout`, the
tensor lists Nunchaku's files hold; the header, under 1 MB, is not counted).

Part 2, loads (measured on CPU): each load runs in a fresh subprocess so its peak resident memory is its own:
peak = the child's VmHWM (reset through /proc/self/clear_refs after its imports; getrusage's ru_maxrss where
that is refused) minus its resident memory before loading. The quantized load is what a run does,
`build_quantized_transformer` (config -> meta device -> every tensor read from the file), on a sparse full-width
FLUX.1-dev int4 r32 file (legacy names, Nunchaku's metadata). The 16-bit load is what diffusers does with the
model's own folder, `FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=bf16)`
(diffusers 0.42 defaults: low_cpu_mem_usage=True, weights through safetensors' memory map), on a sparse bf16
`diffusion_pytorch_model.safetensors`. That call returns views of the memory map with nothing read yet, so
each child then reads one byte of every weight page (as a first forward or `.to(device)` would): the table shows
peak and time both when the call returns and once the weights are resident. The sparse files' holes read back
as zeros at page-cache speed: times leave out the disk (a first load from disk adds file bytes / disk bandwidth),
memory is as with real weights.
The 16-bit FLUX.1-dev transformer (23.8 GB) does not fit this 24 GB machine, so it loads at reduced depth
(`--blocks-16bit`) and its figures are scaled to full depth by bytes, labelled extrapolated. Before each child
the script checks MemAvailable and skips the load with the reason rather than let the machine swap or OOM;
while it runs, a watchdog stops it if MemAvailable falls under 512 MiB.

Target (issue): the quantized load's peak <= 1.3x the file's bytes plus the other components. The child loads
the transformer alone, so the other components (text encoders, VAE, loaded afterwards by diffusers) count 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "pipeline" / "models" / "configs"
MODELS = {"flux.1-dev": "flux", "qwen-image": "qwen-image"}
PRECISIONS = [("int4", 32), ("int4", 128), ("nvfp4", 32)]
LOAD_MODEL = "flux.1-dev"
TARGET_RATIO = 1.3
# SVDQuant's published memory reduction for FLUX.1-dev. The model card of mit-han-lab/svdq-int4-flux.1-dev and
# the SVDQuant blog post (hanlab.mit.edu/blog/svdquant): "On 12B FLUX.1-dev, it achieves 3.6x memory reduction
# compared to the BF16 model"; the paper's abstract (arXiv 2411.05007): "We reduce the memory usage for the 12B
# FLUX.1 models by 3.5x". Neither states exactly what is counted (transformer weights only, as here, or the
# model's memory on the GPU with its buffers; the modulation layers as 4-bit AWQ, as in the published files and
# here, or in 16 bits), so a file-bytes ratio within a few percent of 3.6x agrees with it; it is no exact
# reproduction.
PUBLISHED = {"ratio": 3.6, "source": "mit-han-lab/svdq-int4-flux.1-dev model card and SVDQuant blog: 3.6x memory "
                                    "reduction vs BF16 on 12B FLUX.1-dev; paper abstract (arXiv 2411.05007): 3.5x"}
MARGIN = 1 << 30  # MemAvailable that must remain beyond a load's expected peak
WATCHDOG_FLOOR = 512 << 20  # stop a child when MemAvailable falls under this
# expected peak / file bytes, for the free-memory check only: plain reads hold the tensors once (plus the
# one being converted); a memory map may show the file's pages and the tensors made from them
EXPECTED_PEAK = {"svdq": 1.5, "bf16": 2.2}
GB = 1e9


# ---------- memory of this process and of the machine ----------

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile ... of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^((?:Vm|Rss)\w+):\s+(\d+ kB)", text, re.M)}


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def meminfo() -> dict[str, int]:
    text = Path("/proc/meminfo").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def platform_info() -> dict:
    import diffusers
    import safetensors
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = meminfo()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem.get("MemTotal"),
            "mem_available_bytes": mem.get("MemAvailable"), "machine": platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
            "load_average_start": os.getloadavg()}


# ---------- part 1: sizes on the meta device ----------

def model_config(name: str, blocks: tuple[int, int] | None = None) -> dict:
    """The real diffusers transformer config, at `blocks` = (double, single) depth if given (FLUX)."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    if blocks is not None:
        config = dict(config, num_layers=blocks[0], num_single_layers=blocks[1])
    return config


def layout_bytes(layout: dict) -> int:
    import torch

    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in layout.values())


def sizes() -> list[dict]:
    """bf16 transformer bytes against each file's tensor bytes, per model, at full size."""
    import torch

    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.checkpoint import file_layout

    rows = []
    for name, family in MODELS.items():
        t = meta_transformer(family, model_config(name), torch.bfloat16)
        params = sum(p.numel() for p in t.parameters())
        bf16 = sum(p.numel() * p.element_size() for p in t.parameters())
        files = []
        for precision, rank in PRECISIONS:
            size = layout_bytes(file_layout(t, precision=precision, rank=rank))
            files.append({"precision": precision, "rank": rank, "label": f"{precision} r{rank}", "bytes": size,
                          "ratio_bf16_over_file": bf16 / size})
        rows.append({"model": name, "params": params, "bf16_bytes": bf16, "files": files})
        del t
    return rows


# ---------- part 2: the synthetic files ----------

def write_model_folder(folder: Path, config: dict) -> None:
    """What resolve_model_dir and diffusers need of a model folder: model_index.json and the transformer config."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))


def write_svdq_file(path: Path, config: dict) -> int:
    """A sparse FLUX int4 r32 file with legacy names and the metadata loaders read (config, model_class,
    quantization_config; ComfyUI's comfy_config, a few hundred bytes nobody here reads, is left out); returns its
    size."""
    import torch

    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.checkpoint import file_layout
    from pipeline.families.flux import ARCHITECTURE
    from pipeline.quantization.file_info import quantization_config
    from pipeline.quantization.synthetic import write_sparse_checkpoint

    t = meta_transformer("flux", config, torch.bfloat16)
    metadata = {"config": json.dumps(config), "model_class": ARCHITECTURE.model_class,
                "quantization_config": json.dumps(quantization_config("int4", 32))}
    return write_sparse_checkpoint(path, file_layout(t, precision="int4", rank=32, naming="legacy"), metadata)


def write_bf16_file(path: Path, config: dict) -> int:
    """A sparse diffusion_pytorch_model.safetensors: the bf16 state dict's names, shapes and dtypes."""
    import torch

    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.synthetic import write_sparse_checkpoint

    t = meta_transformer("flux", config, torch.bfloat16)
    layout = {k: (tuple(v.shape), v.dtype) for k, v in t.state_dict().items()}
    return write_sparse_checkpoint(path, layout, {"format": "pt"})


def full_bf16_state_bytes(name: str = LOAD_MODEL) -> int:
    import torch

    from pipeline.models.quantized import meta_transformer

    t = meta_transformer(MODELS[name], model_config(name), torch.bfloat16)
    return sum(v.numel() * v.element_size() for v in t.state_dict().values())


def full_svdq_bytes(name: str = LOAD_MODEL) -> int:
    import torch

    from pipeline.models.quantized import meta_transformer
    from pipeline.quantization.checkpoint import file_layout

    t = meta_transformer(MODELS[name], model_config(name), torch.bfloat16)
    return layout_bytes(file_layout(t, precision="int4", rank=32))


# ---------- part 2: one load in a child process ----------

def child(kind: str, model_dir: str, file: str) -> None:
    """Runs in the subprocess: imports first, then the load alone between the two memory readings."""
    import gc

    import torch

    from pipeline.config.schema import ModelConfig, ModelSource
    from pipeline.models.quantized import build_quantized_transformer, transformer_class
    from pipeline.quantization.apply import module_bytes
    from pipeline.quantization.file_info import inspect_checkpoint

    cls = transformer_class("flux")  # diffusers' lazy import, done before the baseline
    gc.collect()
    before = proc_status()
    hwm_reset = reset_peak()
    start = time.perf_counter()
    if kind == "svdq":
        info = inspect_checkpoint(file)
        model = ModelConfig(name=LOAD_MODEL, family="flux", source=ModelSource.pretrained, path=model_dir)
        act_unsigned = info.act_unsigned if info.act_unsigned is not None else info.precision == "int4"
        transformer = build_quantized_transformer(model, file, info, torch.bfloat16, act_unsigned).transformer
    else:
        transformer = cls.from_pretrained(model_dir, subfolder="transformer", dtype=torch.bfloat16,
                                          local_files_only=True).eval()
    seconds_return = time.perf_counter() - start
    returned = proc_status()
    touch_every_page(transformer)
    seconds = time.perf_counter() - start
    after = proc_status()
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    empty = sum(t.is_meta for t in [*transformer.parameters(), *transformer.buffers()])
    print("RESULT " + json.dumps({
        "seconds_at_return": seconds_return, "peak_rss_at_return": returned["VmHWM"] if hwm_reset else None,
        "seconds": seconds, "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"] if hwm_reset else maxrss,
        "peak_source": "VmHWM reset after imports" if hwm_reset else "ru_maxrss (imports included)",
        "ru_maxrss": maxrss, "rss_after": after["VmRSS"], "rss_anon_after": after.get("RssAnon"),
        "rss_file_after": after.get("RssFile"), "module_bytes": module_bytes(transformer),
        "meta_tensors_left": int(empty)}), flush=True)


def touch_every_page(module) -> None:
    """Read one byte of every page of every weight, as a first forward or `.to(device)` would read them all.

    Why: diffusers' from_pretrained returns weights that are views of safetensors' memory map, resident only once
    read; without this its load would look free and the memory would come later, at first use."""
    import torch

    seen = set()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() in seen or t.numel() == 0:
                continue
            seen.add(t.data_ptr())
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def run_child(kind: str, model_dir: Path, file: Path, expected_peak: int, timeout: float = 1800) -> dict:
    """One load in a fresh interpreter, refused if memory is short, stopped if memory runs out."""
    available = meminfo().get("MemAvailable", 0)
    if available < expected_peak + MARGIN:
        return {"skipped": f"MemAvailable {available / GB:.1f} GB < expected peak {expected_peak / GB:.1f} GB "
                           f"+ {MARGIN / GB:.1f} GB margin; try a smaller depth (--blocks / --blocks-16bit)"}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:  # no pipe to fill up
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(model_dir), str(file)], cwd=ROOT,
                                env=env, stdout=out_f, stderr=err_f, text=True)
        start, low = time.monotonic(), None
        while proc.poll() is None:
            if meminfo().get("MemAvailable", 0) < WATCHDOG_FLOOR:
                low = "MemAvailable fell under 512 MiB: load stopped before the machine ran out"
                proc.kill()
            elif time.monotonic() - start > timeout:
                low = f"load took more than {timeout:.0f} s: stopped"
                proc.kill()
            time.sleep(0.1)
        proc.wait()
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if low:
        return {"skipped": low}
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} load failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def load_row(kind: str, label: str, blocks: tuple[int, int], file_bytes: int, full_bytes: int,
             measured: dict) -> dict:
    """A measured load with its ratios; figures scaled to full depth by bytes where the depth was reduced."""
    full = tuple(model_config(LOAD_MODEL)[k] for k in ("num_layers", "num_single_layers"))
    row = {"kind": kind, "label": label, "model": LOAD_MODEL, "blocks": list(blocks), "full_blocks": list(full),
           "full_depth": tuple(blocks) == full, "file_bytes": file_bytes, "full_depth_file_bytes": full_bytes,
           **measured}
    if "skipped" in measured:
        return row
    row["peak_delta"] = measured["peak_rss"] - measured["rss_before"]
    if measured["peak_rss_at_return"] is not None:
        row["peak_delta_at_return"] = measured["peak_rss_at_return"] - measured["rss_before"]
    row["peak_over_file"] = row["peak_delta"] / file_bytes
    row["seconds_per_gb"] = measured["seconds"] / (file_bytes / GB)
    if not row["full_depth"]:
        scale = full_bytes / file_bytes
        row["extrapolated_full_depth"] = {
            "how": f"measured at {blocks[0]},{blocks[1]} blocks, scaled by file bytes x{scale:.2f} (assumes peak "
                   "and time grow with the bytes loaded)",
            "peak_delta": row["peak_delta"] * scale, "seconds": measured["seconds"] * scale}
    return row


def loads(blocks_q: tuple[int, int], blocks_16: tuple[int, int], workdir: Path, done=None) -> list[dict]:
    done = done or (lambda label: None)  # a progress line after each load
    rows = []
    config_q = model_config(LOAD_MODEL, blocks_q)
    folder_q = workdir / "model-svdq"
    write_model_folder(folder_q, config_q)
    svdq = workdir / "svdq-int4_r32-flux.1-dev.safetensors"
    size_q = write_svdq_file(svdq, config_q)
    measured = run_child("svdq", folder_q, svdq, int(EXPECTED_PEAK["svdq"] * size_q))
    rows.append(load_row("svdq", "svdq int4 r32", blocks_q, size_q, full_svdq_bytes(), measured))
    rows[-1]["code_path"] = "pipeline.models.quantized.build_quantized_transformer (what a run with a file does)"
    done(f"svdq int4 r32 load at {blocks_q[0]},{blocks_q[1]} blocks")
    svdq.unlink()

    config_16 = model_config(LOAD_MODEL, blocks_16)
    folder_16 = workdir / "model-bf16"
    write_model_folder(folder_16, config_16)
    bf16 = folder_16 / "transformer" / "diffusion_pytorch_model.safetensors"
    size_16 = write_bf16_file(bf16, config_16)
    measured = run_child("bf16", folder_16, bf16, int(EXPECTED_PEAK["bf16"] * size_16))
    rows.append(load_row("bf16", "bf16", blocks_16, size_16, full_bf16_state_bytes(), measured))
    rows[-1]["code_path"] = ("diffusers FluxTransformer2DModel.from_pretrained(folder, subfolder='transformer', "
                             "dtype=bfloat16) (defaults: low_cpu_mem_usage, memory-mapped safetensors)")
    done(f"bf16 load at {blocks_16[0]},{blocks_16[1]} blocks")
    bf16.unlink()
    return rows


def target(rows: list[dict]) -> dict:
    """Quantized load peak <= 1.3x file bytes + other components (0: the transformer loads alone)."""
    q = next(r for r in rows if r["kind"] == "svdq")
    name = f"quantized load peak <= {TARGET_RATIO}x file bytes + other components"
    if "skipped" in q:
        return {"target": name, "verdict": "SKIPPED", "reason": q["skipped"]}
    limit = TARGET_RATIO * q["file_bytes"]
    return {"target": name, "value": q["peak_over_file"], "limit": TARGET_RATIO, "other_components_bytes": 0,
            "peak_delta": q["peak_delta"], "limit_bytes": limit, "margin_bytes": limit - q["peak_delta"],
            "blocks": q["blocks"], "full_depth": q["full_depth"],
            "verdict": "PASS" if q["peak_delta"] <= limit else "FAIL"}


def comparison(rows: list[dict]) -> dict | None:
    """The 16-bit load against the quantized one at full depth (measured where measured, else extrapolated)."""
    if any("skipped" in r for r in rows):
        return None
    full = {r["kind"]: r.get("extrapolated_full_depth") or {"peak_delta": r["peak_delta"], "seconds": r["seconds"]}
            for r in rows}
    how = ", ".join(f"{r['label']} {'measured' if r['full_depth'] else 'extrapolated'}" for r in rows)
    return {"bf16_over_svdq_peak": full["bf16"]["peak_delta"] / full["svdq"]["peak_delta"],
            "bf16_over_svdq_seconds": full["bf16"]["seconds"] / full["svdq"]["seconds"], "how": how}


# ---------- output ----------

def parse_blocks(text: str) -> tuple[int, int]:
    double, single = (int(x) for x in text.split(","))
    if double < 1 or single < 1:
        raise argparse.ArgumentTypeError("block counts must be >= 1")
    return double, single


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))
    table = Table(title="Transformer weights, full size (meta device): bf16 parameters vs SVDQuant file tensors")
    for col in ("model", "params", "bf16 GB", "file", "file GB", "bf16 / file"):
        table.add_column(col, justify="left" if col in ("model", "file") else "right")
    for row in result["sizes"]:
        for i, f in enumerate(row["files"]):
            table.add_row(row["model"] if i == 0 else "", f"{row['params'] / 1e9:.2f} B" if i == 0 else "",
                          f"{row['bf16_bytes'] / GB:.2f}" if i == 0 else "", f["label"], f"{f['bytes'] / GB:.2f}",
                          f"{f['ratio_bf16_over_file']:.2f}x")
    console.print(table)
    p = result["published"]
    console.print(f"FLUX.1-dev int4 r32: {p['ours']:.2f}x vs published {p['ratio']}x ({p['source']})")
    table = Table(title=f"Loading {LOAD_MODEL} on CPU, a fresh process per load; peak = VmHWM - RSS before "
                        "loading; resident = after every weight page is read once (as a first forward would)")
    for col in ("load", "blocks", "file GB", "returned: peak GB", "s", "resident: peak GB", "peak / file", "s",
                "full depth: peak GB", "s"):
        table.add_column(col, justify="left" if col == "load" else "right")
    for r in result["loads"]:
        blocks = f"{r['blocks'][0]},{r['blocks'][1]}"
        if "skipped" in r:
            table.add_row(r["label"], blocks, f"{r['file_bytes'] / GB:.2f}", "skipped:", r["skipped"], *[""] * 5)
            continue
        ext = r.get("extrapolated_full_depth")
        full = (f"{ext['peak_delta'] / GB:.2f} extrapolated", f"{ext['seconds']:.1f} extrap.") if ext else (
            f"{r['peak_delta'] / GB:.2f} measured", f"{r['seconds']:.1f}")
        at_return = r.get("peak_delta_at_return")
        table.add_row(r["label"], blocks, f"{r['file_bytes'] / GB:.2f}",
                      "?" if at_return is None else f"{at_return / GB:.2f}", f"{r['seconds_at_return']:.2f}",
                      f"{r['peak_delta'] / GB:.2f}", f"{r['peak_over_file']:.2f}x", f"{r['seconds']:.1f}", *full)
    console.print(table)
    c = result.get("comparison")
    if c:
        console.print(f"full depth, bf16 / svdq int4 r32: peak {c['bf16_over_svdq_peak']:.2f}x, time "
                      f"{c['bf16_over_svdq_seconds']:.2f}x ({c['how']})")
    info = result["platform"]
    busy = max(info["load_average_start"][0], info["load_average_end"][0]) > 0.5 * info["cores"]
    console.print(f"{info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / GB:.1f} GB RAM; load average "
                  f"{info['load_average_start'][0]:.1f} at start, {info['load_average_end'][0]:.1f} at end"
                  + (": other processes shared the CPUs, times may be inflated" if busy else ""))
    t = result["target"]
    if t["verdict"] == "SKIPPED":
        console.print(f"target: {t['target']}: SKIPPED ({t['reason']})")
    else:
        depth = "full depth" if t["full_depth"] else f"measured at {t['blocks'][0]},{t['blocks'][1]} blocks"
        console.print(f"target: {t['target']}: {t['value']:.3f}x <= {t['limit']}x -> {t['verdict']} "
                      f"(margin {t['margin_bytes'] / GB:.2f} GB, {depth})")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        return child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench/load_memory.json")
    ap.add_argument("--blocks", type=parse_blocks, default=None,
                    help="double,single blocks of the quantized load (default: full depth, 19,38)")
    ap.add_argument("--blocks-16bit", type=parse_blocks, default=(4, 8),
                    help="double,single blocks of the 16-bit load (default 4,8: full depth does not fit 24 GB)")
    ap.add_argument("--quick", action="store_true", help="1,1 blocks for both loads: checks the script in seconds")
    ap.add_argument("--workdir", default=None, help="where the sparse files go (default: a temporary folder)")
    args = ap.parse_args()
    full = tuple(model_config(LOAD_MODEL)[k] for k in ("num_layers", "num_single_layers"))
    blocks_q = (1, 1) if args.quick else (args.blocks or full)
    blocks_16 = (1, 1) if args.quick else args.blocks_16bit

    result = {"benchmark": "load_memory", "quick": args.quick, "platform": platform_info()}
    started = time.perf_counter()
    from pipeline.progress import ItemLog

    lines = ItemLog(3)  # stderr: stdout is the tables and the target line
    result["sizes"] = sizes()
    lines("sizes of both models at full size (meta device)")
    flux = next(r for r in result["sizes"] if r["model"] == "flux.1-dev")
    ours = next(f["ratio_bf16_over_file"] for f in flux["files"] if f["label"] == "int4 r32")
    result["published"] = {**PUBLISHED, "ours": ours, "ours_over_published": ours / PUBLISHED["ratio"],
                           "counted": "transformer parameters in bf16 vs every tensor of the int4 r32 file "
                                      "(AdaLN modulation as AWQ W4A16, as published); header not counted"}
    with tempfile.TemporaryDirectory(prefix="load_memory-", dir=args.workdir) as tmp:
        result["loads"] = loads(blocks_q, blocks_16, Path(tmp), lines)
    result["target"] = target(result["loads"])
    result["comparison"] = comparison(result["loads"])
    result["notes"] = [
        "sparse files: holes read as zeros from the page cache, so load times leave out disk reads",
        "other components (text encoders, VAE) are not loaded: they count 0 in the target",
        "16-bit figures at reduced depth are scaled to full depth by bytes (extrapolated, not measured)"]
    result["platform"]["load_average_end"] = os.getloadavg()
    result["seconds_total"] = time.perf_counter() - started
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
