"""The same commands on another exporter's transformer: PP-OCRv4's text recogniser (rapidocr-onnxruntime).

    python benchmarks/ppocr.py [--calib 512] [--holdout 256] [--runs 30] [--only LABEL ...]

The model is ``ch_PP-OCRv4_rec_infer.onnx`` from the ``rapidocr-onnxruntime`` 1.4.4 wheel (fetched
with ``pip download`` into ``benchmarks/_work/`` on first use): a Paddle export at opset 12 whose
weights are all ``Constant`` nodes (no initializers), a MobileNet-like Conv stem and an SVTR neck
of two transformer blocks (attention and Swish feed-forward MatMuls), then a 6,625-way CTC head.

Data: text lines (words, numbers, codes) rendered with the DejaVu fonts at random sizes and
colours, resized to height 48 and padded to 320 as rapidocr feeds them.  The calibration lines
(``--calib``) and the held-out lines (``--holdout``, other strings and draws) never overlap.
Each variant is the command-line tool run with its flags (``onnx-lowrank ppocr_rec.onnx -o ...``)
and is scored on the held-out lines: lines read exactly (greedy CTC decoding against the rendered
text), characters read (1 - edit distance / length), lines decoded exactly as fp32 decodes them,
and the mean (minimum) cosine of each line's output probabilities to fp32's.  Speed: each model
against fp32 at 1 thread, batch 1 (1x3x48x320), interleaved runs, median of per-pair ratios.

Results go to ``docs/benchmarks/ppocr.md`` and ``.json`` (``--only``: to ``benchmarks/_work/partial/``).
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import string
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DOCS, WORK, command_line, environment, markdown_table, paired, run_model, write  # noqa: E402

from onnx_lowrank.passes.int4 import weight_bytes  # noqa: E402
from onnx_lowrank.verify import compare  # noqa: E402

WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
MODEL = WORK / "ppocr_rec.onnx"
H, W = 48, 320
FONTS = "/usr/share/fonts/truetype/dejavu/*.ttf"

#: label -> the tool's flags (``CALIB`` stands for the calibration file).
VARIANTS = {
    "energy 0.93": "--energy 0.93",
    "energy 0.93, gated": "--energy 0.93 --calib CALIB",
    "energy 0.93, MatMul only": "--energy 0.93 --op-types MatMul,Gemm --calib CALIB",
    "data-aware 0.93, MatMul only": "--energy 0.93 --data-aware --op-types MatMul,Gemm --calib CALIB",
    "ffn-keep 0.75": "--energy 1 --ffn-keep 0.75 --calib CALIB",
    "adaptive, widths + ranks, 0.70": "--adaptive --data-aware --ffn-keep auto --target-params 0.7 --op-types MatMul,Gemm "
                                      "--calib CALIB",
    "adaptive, every layer, 0.89": "--adaptive --data-aware --ffn-keep auto --target-params 0.89 --calib CALIB",
    "adaptive, every layer, 0.70": "--adaptive --data-aware --ffn-keep auto --target-params 0.7 --calib CALIB",
    "int4": "--energy 1 --quantize int4 --data-aware --calib CALIB",
    "int4, nearest rounding": "--energy 1 --quantize int4 --data-aware --int4-rounding nearest --int4-correction 0 "
                              "--calib CALIB",
    "int4 + whitened branch": "--energy 1 --quantize int4 --data-aware --int4-correction 0.5 --calib CALIB",
    "int4 + widths, bytes 0.2": "--quantize int4 --data-aware --ffn-keep auto --target-bytes 0.2 --op-types MatMul,Gemm "
                                "--calib CALIB",
    "int8 per-channel": "--energy 1 --quantize int8-per-channel --calib CALIB --keep-failed",
    "int8 per-channel, MatMuls only": "--energy 1 --quantize int8-per-channel --int8-ops matmul --calib CALIB --keep-failed",
}
GATE = "--max-drop 0.05 --metric cosine"

WORDS = ("invoice total amount date order number customer address phone receipt payment balance station report "
         "price tax city street name account delivery office hotel market bank ticket quantity product").split()


def fetch_model() -> Path:
    """The recogniser from the rapidocr-onnxruntime wheel, downloaded once (no install, no dependencies)."""
    if MODEL.exists():
        return MODEL
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(WORK / "wheels")], check=True)
    wheel = next((WORK / "wheels").glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        MODEL.write_bytes(z.read(MEMBER))
    return MODEL


def vocabulary(model: onnx.ModelProto) -> list[str]:
    """CTC classes: blank, the dictionary stored in the model's metadata, then space."""
    chars = {p.key: p.value for p in model.metadata_props}["character"].split("\n")
    return ["", *chars, " "]


def make_lines(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered text lines as the recogniser's input (N x 3 x 48 x 320, in [-1, 1]) and their texts."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob(FONTS))
    if not fonts:
        raise SystemExit(f"no fonts at {FONTS}: install fonts-dejavu-core to render the text lines")
    rng = random.Random(seed)

    def word() -> str:
        c = rng.random()
        if c < 0.5:
            w = rng.choice(WORDS)
            return w.capitalize() if rng.random() < 0.3 else w
        if c < 0.8:
            return str(rng.randint(0, 99999))
        return "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(rng.randint(3, 8)))

    x = np.zeros((n, 3, H, W), np.float32)
    texts = []
    for i in range(n):
        text = " ".join(word() for _ in range(rng.choice((1, 2, 3))))
        font = ImageFont.truetype(rng.choice(fonts), rng.randint(26, 40))
        left, top, right, bottom = font.getbbox(text)
        img = Image.new("RGB", (right - left + 16, bottom - top + 12), tuple(rng.randint(190, 255) for _ in range(3)))
        ImageDraw.Draw(img).text((8 - left, 6 - top), text, font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
        w = min(W, int(np.ceil(H * img.width / img.height)))
        x[i, :, :, :w] = np.asarray(img.resize((w, H), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 127.5 - 1
        texts.append(text)
    return x, texts


def decode(probs: np.ndarray, vocab: list[str]) -> list[str]:
    """Greedy CTC: best class per step, repeats merged, blanks dropped."""
    out = []
    for row in probs.argmax(-1):
        keep = np.r_[True, row[1:] != row[:-1]] & (row != 0)
        out.append("".join(vocab[i] for i in row[keep]).strip())
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quality(probs: np.ndarray, texts: list[str], vocab: list[str], ref: np.ndarray) -> dict[str, float]:
    read = decode(probs, vocab)
    ref_read = decode(ref, vocab)
    cos = compare("probs", ref.reshape(len(ref), -1), probs.reshape(len(probs), -1))
    return {"lines_read": float(np.mean([r == t for r, t in zip(read, texts)])),
            "chars_read": 1 - sum(edit_distance(r, t) for r, t in zip(read, texts)) / sum(len(t) for t in texts),
            "same_as_fp32": float(np.mean([r == s for r, s in zip(read, ref_read)])),
            "cosine_mean": cos.cosine_mean, "cosine_min": cos.cosine_min}


def run_tool(label: str, flags: str, calib: Path, out: Path) -> dict:
    """The command-line tool on the model; its report, or why it wrote nothing."""
    report = out.with_suffix(".json")
    args = [a if a != "CALIB" else str(calib) for a in flags.split()]
    if "--calib" in args and "--adaptive" not in args:  # (adaptive mode's --max-drop is its goal, not a gate)
        args += GATE.split()
    cmd = [sys.executable, "-m", "onnx_lowrank", str(MODEL), "-o", str(out), *args, "--report", str(report), "-q"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    info = {"flags": " ".join(a if a != str(calib) else "calib.npz" for a in args), "seconds": round(time.perf_counter() - t, 1),
            "exit": p.returncode, "summary": (p.stdout.strip().splitlines() or [""])[-1]}
    if p.returncode:
        info["error"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    if report.exists():
        rep = json.loads(report.read_text())
        totals = rep.get("totals", {})
        info["params_kept"] = totals.get("params_after", 0) / max(totals.get("params_before", 1), 1)
        info["factorized"], info["narrowed"] = totals.get("factorized"), totals.get("narrowed")
        info["widths"] = [b.get("kept") for b in (rep.get("width") or {}).get("blocks", [])]
    print(label, info, file=sys.stderr, flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=512, help="calibration lines (default 512)")
    ap.add_argument("--holdout", type=int, default=256, help="held-out lines (default 256)")
    ap.add_argument("--runs", type=int, default=30, help="timed pairs at batch 1")
    ap.add_argument("--only", nargs="*", default=None, help="labels of the variants to run (fp32 always runs)")
    ap.add_argument("--merge", action="store_true", help="with --only: put these rows into docs/benchmarks/ppocr.json "
                    "(in the variants' order) and rewrite the table, instead of writing to benchmarks/_work/partial/")
    args = ap.parse_args(argv)

    model = onnx.load(str(fetch_model()))
    vocab = vocabulary(model)
    x_cal, _ = make_lines(args.calib, seed=1)
    x_hold, texts = make_lines(args.holdout, seed=2)
    calib = WORK / "ppocr_calib.npz"
    np.savez(calib, x=x_cal)
    ref = run_model(model, {"x": x_hold}, batch=64)
    out_dir = WORK / "ppocr"
    out_dir.mkdir(parents=True, exist_ok=True)

    data = {"fp32": {"flags": "", "exit": 0, "size": MODEL.stat().st_size, "matmul_bytes": weight_bytes(model),
                     **quality(ref, texts, vocab, ref)}}
    models = {}
    for label, flags in VARIANTS.items():
        if args.only is not None and label not in args.only:
            continue
        out = out_dir / (label.replace(" ", "_").replace(",", "").replace("+", "").replace("(", "").replace(")", "") + ".onnx")
        out.unlink(missing_ok=True)
        info = run_tool(label, flags, calib, out)
        if out.exists():
            m = onnx.load(str(out))
            info["size"], info["matmul_bytes"] = out.stat().st_size, weight_bytes(m)
            info.update(quality(run_model(m, {"x": x_hold}, batch=64), texts, vocab, ref))
            models[label] = m
        data[label] = info
    for label, m in models.items():
        p = paired(model, m, threads=1, batch=1, runs=args.runs, warmup=5, input_shape=(f"x:1x3x{H}x{W}",))
        data[label]["vs_fp32_b1"], data[label]["vs_fp32_b1_p10_p90"] = p["speedup"], (p["speedup_p10"], p["speedup_p90"])
        print(label, {k: v for k, v in data[label].items() if k != "widths"}, file=sys.stderr, flush=True)

    command = command_line()
    env = environment([1], f"{args.runs} paired runs")
    if args.merge:  # these rows into the full run's results, each keeping the command and machine it came from
        old = json.loads((DOCS / "ppocr.json").read_text())
        command, env = old["command"], old.get("environment", env)
        for label in data:
            if label != "fp32":
                data[label]["run_by"] = command_line()
                data[label]["machine"] = machine_info()["cpu"]
        merged = {**old["variants"], **{k: v for k, v in data.items() if k != "fp32"}}
        data = {k: merged[k] for k in ["fp32", *VARIANTS] if k in merged}
    rows = []
    for label, e in data.items():
        if e["exit"]:
            if "size" not in e:
                rows.append([label, f"`{e['flags']}`", "refused: " + e.get("error", "").split("error: ")[-1][:110] + "...",
                             "", "", "", "", "", ""])
                continue
        speed = f"x{e['vs_fp32_b1']:.2f}" if "vs_fp32_b1" in e else "-"
        rows.append([label + (" (failed the gate, kept)" if e["exit"] else ""), f"`{e['flags']}`" if e["flags"] else "",
                     f"{e['matmul_bytes'] / 2**20:.2f}", f"{e['size'] / 2**20:.2f}",
                     f"{e['lines_read']:.3f}", f"{e['chars_read']:.4f}", f"{e['same_as_fp32']:.3f}",
                     f"{e['cosine_mean']:.4f} ({e['cosine_min']:.3f})", speed])
    text = "\n".join([
        "# The same commands on PP-OCRv4's text recogniser (rapidocr-onnxruntime)",
        "",
        f"Measured by `{command}`: `{MEMBER}` from the `{WHEEL}` wheel (Paddle export, opset 12, every "
        f"weight a `Constant` node), {args.calib} rendered calibration lines, {args.holdout} held-out lines (other "
        "strings and draws). Each row is `onnx-lowrank ppocr_rec.onnx -o out.onnx` with its flags; runs with "
        f"calibration data are gated by `{GATE}`. *Lines read*: held-out lines decoded exactly as rendered; *chars "
        "read*: 1 - edit distance / characters; *same as fp32*: lines decoded as the fp32 model decodes them; cosine: "
        "of each line's output probabilities to fp32's, mean (minimum). Speed: each model against fp32 at 1 thread, "
        f"batch 1 (1x3x48x320), interleaved in one process, median of {args.runs} per-pair ratios.",
        "",
        env,
        "",
        markdown_table(["variant", "flags", "MatMul weights MiB", "file MiB", "lines read", "chars read", "same as fp32",
                        "cosine to fp32", "vs fp32, batch 1"], rows),
        "",
        "*MatMul weights*: the constants MatMul/Gemm/MatMulNBits nodes read (codes, scales, factors); the rest of the "
        "file is Conv kernels (6.3 MiB). Rows with `--op-types MatMul,Gemm` leave the Convs dense; without it the rule "
        "(`--energy`) cuts them as it cuts the MatMuls, and `--target-params` with `--adaptive` sizes them with the "
        "MatMuls, the fraction then being of every candidate weight (2.67 M parameters, against 1.0 M of MatMul "
        "weights: 0.89 of every weight is about the parameter count of 0.70 of the MatMul weights). The int8 "
        "row is onnxruntime's `quantize_dynamic(per_channel=True)` as the tool runs it (Conv kernels included), written "
        "despite the gate (`--keep-failed`) to show its effect; *MatMuls only* (`--int8-ops matmul`) leaves the Convs float. Adaptive mode is not gated (its `--max-drop` is a goal).",
        *([""] + [f"Row *{label}* from a later run, `{e['run_by']}` (the same data"
                  + (f"; on {e['machine']}" if "machine" in e else " and machine") + "; its speed paired with fp32 in that run)."
                  for label, e in data.items() if "run_by" in e] if any("run_by" in e for e in data.values()) else []),
    ])
    folder = DOCS if args.only is None or args.merge else WORK / "partial"
    write("ppocr", text, {"variants": data, "calib": args.calib, "holdout": args.holdout, "runs": args.runs,
                          "command": command, "environment": env}, folder)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
