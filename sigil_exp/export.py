"""`python -m sigil_exp.export`: turn a run's adapter into a standalone transformers checkpoint.

    python -m sigil_exp.export outputs/2026-11-28/10-00-00                      # -> <run>/export-nf4_roundtrip/
    python -m sigil_exp.export outputs/.../adapter --merge-base original --dtype float16 --out /models/mine
    python -m sigil_exp.export outputs/.../export-nf4_roundtrip --push-to-hub me/llama-rust --private
    python -m sigil_exp.export outputs/... --gguf ~/src/llama.cpp               # + model-bf16.gguf via llama.cpp

The base is loaded in full precision (never merged into 4-bit weights and re-quantised), the LoRA /
rsLoRA / DoRA adapter is merged (`sigil_exp.merge`, the same code evaluation's merged copy uses),
and the folder gets safetensors (sharded above --max-shard-size), the tokenizer with its chat
template, generation_config.json, a model card (README.md), the run's resolved_config.yaml and
sigil_export.json (provenance). Merge bases:
  nf4_roundtrip (default)  every linear the run held in 4-bit is quantised and dequantised with the
                           run's own settings first: the merged model computes what training saw.
  original                 the base's own weights plus the adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sigil_exp.artifacts import EXPORT_MARKER, Artifact, find_artifact, load_run_config, load_tokenizer_for
from sigil_exp.config import RunConfig, SigilError
from sigil_exp.model_card import model_card

log = logging.getLogger("sigil_exp.export")
MERGE_BASES = ("nf4_roundtrip", "original")


def export(art: Artifact, cfg: RunConfig, out: Path, merge_base: str = "nf4_roundtrip", dtype: str = "bfloat16",
           max_shard_size: str = "5GB", device: str = "auto", command: str = "") -> Path:
    """Merge the artifact's adapter into its run's base and write the export folder `out`
    (built in a temporary folder beside it and renamed at the end: nothing half-written remains)."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    from sigil_exp.evaluate.generate import eos_ids
    from sigil_exp.merge import lora_deltas, merge_into
    from sigil_exp.model import DTYPES, resolve_model_path

    if art.kind == "export":
        raise SigilError(f"{art.path} is already an export (merged); pass the run folder or its adapter/ folder.")
    if merge_base not in MERGE_BASES:
        raise SigilError(f"--merge-base {merge_base} is not one of {', '.join(MERGE_BASES)}.")
    q = cfg.quant
    if merge_base == "nf4_roundtrip" and q.method == "int8":
        raise SigilError("--merge-base nf4_roundtrip needs a 4-bit run (quant=nf4|fp4), but this run used quant=int8, "
                         "whose outlier decomposition has no weight to round-trip; use --merge-base original.")
    if out.exists() and any(out.iterdir()):
        raise SigilError(f"{out} already exists and is not empty; pass another --out or delete it first.")
    adapter_file = art.adapter / "adapter_model.safetensors"
    if not adapter_file.is_file():
        raise SigilError(f"{art.adapter} holds no adapter_model.safetensors (an old .bin adapter); re-save it with "
                         "a current peft (model.save_pretrained) and export again.")
    adapter_cfg = json.loads((art.adapter / "adapter_config.json").read_text())
    deltas = lora_deltas(safetensors.torch.load_file(str(adapter_file)), adapter_cfg, str(art.adapter))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SigilError("--device cuda but torch sees no CUDA GPU; use --device cpu.")

    t0 = time.perf_counter()
    base_path = resolve_model_path(cfg.model)
    roundtrip = merge_base == "nf4_roundtrip" and q.method in ("nf4", "fp4")
    # nf4_roundtrip loads in the compute dtype, exactly what the 4-bit load quantised; original in the checkpoint's own
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=DTYPES[q.compute_dtype] if roundtrip else "auto", device_map={"": 0} if dev == "cuda" else "cpu",
        revision=cfg.model.revision if not Path(base_path).is_dir() else None, trust_remote_code=cfg.model.trust_remote_code)
    counts = merge_into(model, deltas, q if roundtrip else None, DTYPES[dtype])
    log.info("merged %d adapted layers (%d NF4-roundtripped first) in %.1fs on %s", counts["merged"],
             counts["roundtripped"], time.perf_counter() - t0, dev)
    if merge_base == "nf4_roundtrip" and not roundtrip:
        log.info("quant.method=%s: the run's base was not 4-bit, so nf4_roundtrip equals original", q.method)

    tokenizer = load_tokenizer_for(art, cfg)
    gen = model.generation_config
    gen.eos_token_id = eos_ids(tokenizer)
    gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    meta = {
        "source": str(art.run or art.path), "adapter": str(art.adapter), "adapter_sha256": _sha256(adapter_file),
        "merge_base": merge_base, "dtype": dtype, "base_model": cfg.model.name_or_path, "revision": cfg.model.revision,
        "quant": asdict(q), "roundtripped_layers": counts["roundtripped"], "merged_layers": counts["merged"],
        "lora": {k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
        "data_format": cfg.data.format, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or f"python -m sigil_exp.export {art.path} --merge-base {merge_base} --dtype {dtype}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        shutil.copyfile(art.config, tmp / "resolved_config.yaml")
        (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(art, cfg, meta))
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp and shard writes are private; an export is meant to be shared
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("export written to %s in %.1fs", out, time.perf_counter() - t0)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def push_to_hub(folder: Path, repo: str, private: bool = False, revision: str | None = None, api: Any = None) -> str:
    """Upload an export folder to a Hugging Face Hub model repo (created if needed; `revision`
    = a branch, created from main if needed). Offline or unreachable: one sentence."""
    if api is None:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise SigilError(f"HF_HUB_OFFLINE is set, so nothing was pushed to {repo}; the export is complete in "
                             f"{folder}: push it later with `python -m sigil_exp.export {folder} --push-to-hub {repo}`.")
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision, repo_type="model",
                          commit_message=f"sigil_exp export of {json.loads((folder / EXPORT_MARKER).read_text())['source']}",
                          ignore_patterns=["eval/*", ".*"])
    except SigilError:
        raise
    except Exception as e:
        raise SigilError(f"Pushing {folder} to the hub repo {repo} failed ({type(e).__name__}: {str(e)[:200]}); check "
                         "the network and `hf auth login`, then rerun with the export folder as the path.") from None
    return str(url)


def to_gguf(folder: Path, llama_cpp: str | None, dtype: str) -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py (from the user's checkout; it is not on PyPI)."""
    if not llama_cpp:
        raise SigilError("--gguf needs the path of a llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp; "
                         "its convert_hf_to_gguf.py is not on PyPI): --gguf ~/src/llama.cpp.")
    script = Path(llama_cpp).expanduser() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SigilError(f"{script} does not exist; pass the root of a llama.cpp checkout to --gguf.")
    outtype = "bf16" if dtype == "bfloat16" else "f16"
    target = folder / f"model-{outtype}.gguf"
    proc = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(target), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not target.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SigilError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder} ({tail[:300]}); the safetensors "
                         "export is complete, convert it by hand once fixed.")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sigil_exp.export",
                                 description="Merge a run's LoRA adapter into its base: a standalone transformers checkpoint.")
    ap.add_argument("path", help="run folder or adapter folder (an export folder: only --push-to-hub / --gguf)")
    ap.add_argument("--out", type=Path, help="export folder (default <run>/export-<merge base>)")
    ap.add_argument("--merge-base", default="nf4_roundtrip", choices=MERGE_BASES,
                    help="nf4_roundtrip: the 4-bit weights training saw (default); original: the base's own weights")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="saved weight dtype")
    ap.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to merge (auto: CUDA if any)")
    ap.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this Hugging Face Hub model repo")
    ap.add_argument("--private", action="store_true", help="create the hub repo private")
    ap.add_argument("--revision", help="hub branch to push to (created if needed)")
    ap.add_argument("--gguf", nargs="?", const="", metavar="LLAMA_CPP", help="also write a GGUF with llama.cpp's converter")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        if args.gguf == "":
            to_gguf(Path("."), None, args.dtype)  # says what to pass, before any work
        art = find_artifact(args.path)
        if art.kind == "export":
            folder = art.path
        else:
            out = args.out or (art.run or art.path) / f"export-{args.merge_base}"
            folder = export(art, load_run_config(art.config), out.expanduser().resolve(), args.merge_base, args.dtype,
                            args.max_shard_size, args.device, "python -m sigil_exp.export " + " ".join(
                                sys.argv[1:] if argv is None else argv))
        if args.gguf:
            print(f"gguf: {to_gguf(folder, args.gguf, json.loads((folder / EXPORT_MARKER).read_text())['dtype'])}")
        if args.push_to_hub:
            print(f"pushed: {push_to_hub(folder, args.push_to_hub, args.private, args.revision)}")
    except SigilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"export: {folder}\n  load: AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
          f"  evaluate: python -m sigil_exp.evaluate {folder}\n  try: python -m sigil_exp.generate {folder} --prompt '...'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
