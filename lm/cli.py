"""`m3ae lm-eval` and `m3ae generate`: held-out perplexity of, and samples from, a trained LM.

    m3ae lm-eval --model runs/fcm/model --data data/shakespeare/heldout --out ppl.json
    m3ae generate --model runs/fcm/model --prompt "ROMEO." --max-new-tokens 80 --top-k 40
    m3ae generate --model runs/fcm/model --prompt "To be" --greedy
    m3ae generate --model runs/fcm/model --prompt "To be" --greedy --no-cache   # the reference

`--model` is the `model/` directory a training run writes (`lm.pretrained` layout). Both run
with FCM off, on the local devices. `generate` decodes against a key/value cache; `--no-cache`
recomputes the whole prefix for every token instead (same tokens, slower: `lm/generate.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_lm_commands(verbs: Any) -> None:
    p = verbs.add_parser("lm-eval", help="held-out perplexity of a trained causal LM")
    p.add_argument("--model", required=True, help="a trained LM directory (<workdir>/model)")
    p.add_argument("--data", required=True, help="text: tars, JSONL or .txt (dir, glob, braces)")
    p.add_argument("--seq-len", type=int, default=0, help="row length (default: the training one)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole text")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run_lm_eval)

    p = verbs.add_parser("generate", help="sample text from a trained causal LM")
    p.add_argument("--model", required=True, help="a trained LM directory (<workdir>/model)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="recompute the whole prefix per token instead of using a KV cache (the reference)",
    )
    p.set_defaults(func=run_generate)


def run_lm_eval(args: argparse.Namespace) -> int:
    from lm.evaluate import perplexity
    from lm.pretrained import load_lm, read_lm_config

    meta = read_lm_config(args.model)
    seq_len = args.seq_len or int(meta.get("seq_len", 256))
    model, params = load_lm(args.model)
    print(f"scoring {args.data} with {args.model} (step {meta.get('step')}, rows of {seq_len})")
    result = perplexity(model, params, args.data, seq_len, args.batch_size, args.max_batches)
    result.update(model=str(Path(args.model).absolute()), step=meta.get("step"))
    print(
        f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
        f"accuracy {result['accuracy']:.4f} over {result['tokens']:,} tokens"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import jax

    from lm.generate import generate
    from lm.model import EOS_ID
    from lm.pretrained import load_lm
    from pipelines.tokenizer import load_gpt2_tokenizer

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    tok = load_gpt2_tokenizer()
    model, params = load_lm(args.model)
    prompt = [EOS_ID] + tok.encode(args.prompt, add_special_tokens=False).ids  # EOS opens docs
    ids = generate(
        model,
        params,
        [prompt] * args.num_samples,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        greedy=args.greedy,
        rng=jax.random.PRNGKey(args.seed),
        eos_id=EOS_ID,
        cache=args.cache,
    )
    for i, row in enumerate(ids):
        new = [int(t) for t in row[len(prompt) :] if t != EOS_ID]
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tok.decode(new))
    return 0
