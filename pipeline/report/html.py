"""report/index.html: one static page (inline CSS and JS, relative links): it works from the file system offline."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from pipeline.config.schema import ReportConfig
from pipeline.outputs.atomic import atomic_write_bytes

CSS = """body{font-family:sans-serif;margin:1em 2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee;cursor:pointer;user-select:none}
th.asc:after{content:' \\25B2'}th.desc:after{content:' \\25BC'}td:first-child,th:first-child{text-align:left}
.prompt{border-top:2px solid #999;margin-top:1.2em}.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:12px}figcaption{max-width:260px}.worst{color:#b00}.plots img{max-width:420px}
.diff{display:none}.showdiff .diff{display:inline}.showdiff .thumb{display:none}"""

JS = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th);
const asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(h=>h.classList.remove('asc','desc'));
th.classList.add(asc?'asc':'desc');const rows=[...t.tBodies[0].rows];
const v=r=>{const s=r.cells[i].dataset.v??r.cells[i].textContent;const n=parseFloat(s);return isNaN(n)?s:n};
rows.sort((a,b)=>{const x=v(a),y=v(b);return (x>y?1:x<y?-1:0)*(asc?1:-1)});rows.forEach(r=>t.tBodies[0].appendChild(r))}
document.querySelectorAll('th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
document.querySelectorAll('button.toggle').forEach(b=>b.addEventListener('click',()=>{
b.closest('.prompt').classList.toggle('showdiff')}));
window.addEventListener('load',()=>{const imgs=[...document.images];
const ok=imgs.length>0&&imgs.every(i=>i.complete&&i.naturalWidth>0)&&document.querySelector('#variants tbody tr')!==null;
document.body.dataset.ok=ok?'1':'0';document.body.dataset.images=imgs.length});"""


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(x: Any) -> str:
    return f'<td data-v="{escape(_fmt(x))}">{escape(_fmt(x))}</td>'


def _severity(pairs: list[dict[str, Any]], names: list[str]) -> tuple[str, float]:
    """How much quantization hurts one prompt: the worst LPIPS (higher worse) or else the worst PSNR (lower worse)."""
    if "lpips" in names:
        vals = [p["metrics"]["lpips"] for p in pairs if "lpips" in p["metrics"]]
        return "lpips", max(vals) if vals else 0.0
    vals = [p["metrics"]["psnr"] for p in pairs if "psnr" in p["metrics"]]
    return "psnr", -min(vals) if vals else 0.0


def write_html(data: dict[str, Any], cfg: ReportConfig, out: Path) -> Path:
    names, set_names = data["metric_names"], data["set_metric_names"]
    ref = data["reference"]
    h = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Quality report</title>",
         f"<style>{CSS}</style></head><body>", "<h1>Quality report</h1>",
         f"<p>{escape(data['folder'])}<br>reference: <b>{escape(ref['label'])}</b> ({escape(ref['name'])})</p>"]
    heads = ["variant", "precision", "rank", "pairs", *(f"{n} mean" for n in names), *(f"{n} min" for n in names),
             *set_names, "latency/img s", "peak MiB", "weights MiB", "weights ratio"]
    h.append("<table id='variants'><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in heads)
             + "</tr></thead><tbody>")
    for v in [ref, *data["variants"]]:
        m = v.get("metrics", {})
        # the variant's label; its job folder on hover
        cells = [f"<td title='{escape(v['name'], quote=True)}'>{escape(v['label'])}</td>", _cell(v["precision"]),
                 _cell(v["rank"]), _cell(v.get("pairs")),
                 *(_cell(m.get(n, {}).get("mean")) for n in names), *(_cell(m.get(n, {}).get("min")) for n in names),
                 *(_cell(v.get("set_metrics", {}).get(n)) for n in set_names), _cell(v["latency_s"]),
                 _cell(round(v["peak_mem_bytes"] / 2**20, 1) if v["peak_mem_bytes"] else None),
                 _cell(round(v["bytes_after"] / 2**20, 2) if v["bytes_after"] else None), _cell(v["weight_ratio"])]
        h.append("<tr>" + "".join(cells) + "</tr>")
    h.append("</tbody></table><p>Click a header to sort.</p>")
    if data["skipped"]:
        h.append("<h3>Skipped metrics</h3><ul>" + "".join(
            f"<li><b>{escape(k)}</b>: {escape(str(r))}</li>" for k, r in data["skipped"].items()) + "</ul>")
    if data["mismatches"]:
        h.append("<h3>Mismatched pairs (not compared)</h3><ul id='mismatches'>" + "".join(
            f"<li>{escape(m['variant'])} {escape(m['file'])}: {escape(m['reason'])}</li>"
            for m in data["mismatches"]) + "</ul>")
    h.append("<h2>Plots</h2><div class='plots row'>" + "".join(
        f"<a href='{escape(p)}'><img src='{escape(p)}' alt='{escape(p)}'></a>" for p in data.get("plots", [])) + "</div>")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for p in data["pairs"]:
        by_prompt.setdefault(f"{p['id']}_{p['seed']}", []).append(p)
    order = sorted(by_prompt, key=lambda k: -_severity(by_prompt[k], names)[1])
    by = "LPIPS" if "lpips" in names else "PSNR"
    h.append(f"<h2>Images, where quantization hurts most first (by {by})</h2>")
    for rank, key in enumerate(order):
        pairs = by_prompt[key]
        refimg = data["reference_images"][key]
        worst = " <span class='worst'>(among the worst {})</span>".format(cfg.worst_k) if rank < cfg.worst_k else ""
        h.append(f"<div class='prompt' id='p-{escape(key)}'><h3>{escape(key)}{worst}</h3>"
                 f"<p>{escape(refimg['prompt'] or '')}</p><button class='toggle'>difference heat map</button>"
                 "<div class='row'>")
        for given in refimg.get("inputs") or []:  # edit / inpainting runs: the input(s) first
            h.append(f"<figure><a href='{escape(given['image'])}'><img class='input' src='{escape(given['thumb'])}' "
                     f"alt='input {escape(given['role'])}'></a><figcaption><b>input {escape(given['role'])}</b><br>"
                     f"{escape(given['name'])}</figcaption></figure>")
        h.append(f"<figure><a href='{escape(refimg['image'])}'><img class='ref' src='{escape(refimg['thumb'])}' "
                 f"alt='reference'></a><figcaption><b>{escape(ref['label'])}</b> (reference)</figcaption></figure>")
        for p in pairs:
            label = next((v["label"] for v in data["variants"] if v["name"] == p["variant"]), p["variant"])
            ms = ", ".join(f"{k} {_fmt(x)}" for k, x in p["metrics"].items())
            h.append(f"<figure><a href='{escape(p['image'])}'><img class='thumb' src='{escape(p['thumb'])}' "
                     f"alt='{escape(p['variant'])}'><img class='diff' src='{escape(p['diff'])}' alt='difference'></a>"
                     f"<figcaption><b>{escape(label)}</b><br>{escape(ms)}</figcaption></figure>")
        h.append("</div></div>")
    h.append(f"<script>{JS}</script></body></html>")
    index = out / "index.html"
    atomic_write_bytes(index, "\n".join(h).encode())
    return index
