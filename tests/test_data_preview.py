"""`python -m sigil_exp.data.preview` shows what a run trains on: the same config, the same
datasets (cache), the trained span marked exactly where the loss mask is, the source line named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, smoke_cfg

from sigil_exp.data.format import completion_prompt
from sigil_exp.data.preview import BRIGHT, CLOSE, DIM, OPEN, render

HEADER = re.compile(r"^=== train\[(\d+)\]  (.+?)  \((\d+) tokens, (\d+) trained\) ===$", re.M)


def test_preview_marks_exactly_the_loss_tokens(cache_dir):
    from sigil_exp.data import build_datasets
    from sigil_exp.model import load_tokenizer, resolve_model_path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": ""}
    res = subprocess.run([sys.executable, "-m", "sigil_exp.data.preview", "experiment=smoke", f"cache_dir={cache_dir}",
                          "--n", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "\x1b[" not in out  # not a terminal: brackets, no colour

    cfg = smoke_cfg(cache_dir)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    bundle = build_datasets(cfg.data, tok, cfg.model.max_seq_len, cfg.train.seed, cfg.cache_dir)
    assert bundle.stats["cache_hit"] is True  # the preview built (and cached) the run's very datasets

    heads = list(HEADER.finditer(out))
    assert [int(h.group(1)) for h in heads] == [0, 1, 2, 3]
    ends = [h.start() for h in heads[1:]] + [out.index("\n=== data stats ===")]
    for head, end in zip(heads, ends, strict=True):
        i = int(head.group(1))
        body = out[head.end() + 1:end].rstrip("\n")
        ids, mask = bundle.train[i]["input_ids"], bundle.train[i]["completion_mask"]
        assert (int(head.group(3)), int(head.group(4))) == (len(ids), sum(mask[1:]))
        # the bracketed spans are the trained runs of the mask, in order
        runs, cur, cur_flag = [], [], None
        for pos, (t, m) in enumerate(zip(ids, mask, strict=True)):
            flag = bool(m) and pos > 0
            if flag != cur_flag and cur:
                runs.append((cur, cur_flag))
                cur = []
            cur.append(t)
            cur_flag = flag
        runs.append((cur, cur_flag))
        assert re.findall(f"{OPEN}(.*?){CLOSE}", body, re.S) == [
            tok.decode(r, skip_special_tokens=False) for r, flag in runs if flag]
        assert body.replace(OPEN, "").replace(CLOSE, "") == tok.decode(ids, skip_special_tokens=False)
        # ... and it is the record named in the header: prompt untrained, gen + EOS trained
        origin = head.group(2)
        path, line = re.match(r"(.+):(\d+)(?: \[part \d+/\d+\])?$", origin).groups()
        row = json.loads(Path(path).read_text().splitlines()[int(line) - 1])
        whole = f"{tok.bos_token}{completion_prompt(row['prompt'])}{OPEN}{row['gen']}{tok.eos_token}{CLOSE}"
        if "[part 1/" in origin:
            assert whole.startswith(body[:-1]) and body.endswith(CLOSE)
        elif "[part" not in origin:
            assert body == whole
    stats = out[out.index("=== data stats ==="):]
    assert re.search(r"train_loss_tokens\s+\d+", stats) and re.search(r"cache_hit\s+(True|False)", stats)


def test_render_colours_on_a_terminal():
    from test_data import make_tokenizer

    tok = make_tokenizer()
    ids = tok("pub fn add(a: i32, b: i32) -> i32 { a + b }", add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    mask = [0, 0] + [1] * (len(ids) - 2)
    head, tail = tok.decode(ids[:2]), tok.decode(ids[2:])
    assert render(ids, mask, tok, color=False) == f"{head}{OPEN}{tail}{CLOSE}"
    assert render(ids, mask, tok, color=True) == f"{DIM}{head}\x1b[0m{BRIGHT}{tail}\x1b[0m"
    first = tok.decode(ids[:1])
    assert render(ids, [1] * len(ids), tok, color=False) == f"{first}{OPEN}{tok.decode(ids[1:])}{CLOSE}"  # never position 0
