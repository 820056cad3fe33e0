"""Load test of `facellm serve` with the official `openai` client (AsyncOpenAI), loopback only, bounded:

1. one request at a time, the single-request greedy answer of every prompt;
2. CLIENTS concurrent streaming clients (prompts with and without the face image, round robin): every
   answer must equal its single-request answer, every client must complete, no error; prints requests/s
   and p50/p99 time to first token;
3. the same with every other client hanging up after a few chunks: the rest must complete with the same
   answers, and the server's KV blocks in use must return to zero.

    tools/.venv/bin/python tools/load_test.py [--facellm target/release/facellm] [--clients 64] [--max-tokens 16]
"""
import argparse
import asyncio
import statistics
import sys
import time

import openai
from openai import AsyncOpenAI

import serve_harness as h

PROMPTS = ["Describe the facial expression of this person.", "How old does this person look?",
           "What is the person wearing?", "Is the person smiling?"]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one(client, msgs, max_tokens, hang_up_after=None):
    """Streams one answer: (text, ttft seconds, completed)."""
    t0 = time.perf_counter()
    ttft, text, chunks = None, "", 0
    stream = await client.chat.completions.create(model=h.MODEL_NAME, messages=msgs, max_tokens=max_tokens,
                                                  temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text += chunk.choices[0].delta.content
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                await stream.close()
                return text, ttft, False
    return text, ttft, True


async def run(args, face):
    failures = []
    variants = [(p, img) for p in PROMPTS for img in (face, None)]
    msgs = [h.messages(p, img) for p, img in variants]
    server_args = ("--max-seqs", str(args.max_seqs), "--max-queue", str(max(64, args.clients)))
    # The single-request answers come from a server of their own, so that the load below starts with cold
    # vision and prefix caches.
    with h.server(args.facellm, args.model_dir, *server_args) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        single = []
        for m in msgs:
            text, _, done = await one(client, m, args.max_tokens)
            single.append(text)
        await client.close()
    print(f"single-request answers: {len(single)} prompts ({len(PROMPTS)} questions, with and without the face)")
    with h.server(args.facellm, args.model_dir, *server_args) as base:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, msgs[i % len(msgs)], args.max_tokens)
                                         for i in range(args.clients)), return_exceptions=True)
        wall = time.perf_counter() - t0
        ttfts = []
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                failures.append(f"client {i}: {r!r}")
                continue
            text, ttft, done = r
            ttfts.append(ttft)
            if not done or text != single[i % len(msgs)]:
                failures.append(f"client {i}: answer differs from its single-request answer")
        ok = len(ttfts)
        print(f"{args.clients} concurrent streaming clients (batch of {args.max_seqs}, cold caches): {ok} completed in "
              f"{wall:.2f} s = {ok / wall:.2f} requests/s; TTFT p50 {percentile(ttfts, 50) * 1e3:.0f} ms, "
              f"p99 {percentile(ttfts, 99) * 1e3:.0f} ms")

        results = await asyncio.gather(*(one(client, msgs[i % len(msgs)], args.max_tokens,
                                             hang_up_after=2 if i % 2 == 0 else None)
                                         for i in range(args.clients)), return_exceptions=True)
        rest = 0
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                failures.append(f"phase 2 client {i}: {r!r}")
            elif i % 2 == 1:
                text, _, done = r
                rest += done and text == single[i % len(msgs)]
                if not done or text != single[i % len(msgs)]:
                    failures.append(f"phase 2 client {i}: did not complete with its single-request answer")
        used = h.wait_metric(base, "facellm_kv_blocks_used", lambda v: v == 0, timeout=60)
        cancelled = h.metric(base, 'facellm_sequences_finished_total{reason="cancelled"}')
        print(f"half hang up: {rest}/{args.clients - args.clients // 2} others completed with their answers; "
              f"{cancelled:.0f} sequences cancelled; KV blocks in use afterwards: {used:.0f}")
        if used != 0:
            failures.append(f"{used:.0f} KV blocks still in use after the clients left")
        await client.close()
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facellm", default=None, help="facellm binary (default target/release, else target/debug)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-seqs", type=int, default=32, help="the server's batch size")
    args = ap.parse_args()
    args.facellm = args.facellm or h.default_binary()
    with h.tempdir() as d:
        face = h.demo_model(args.facellm, d)
        args.model_dir = d
        failures = asyncio.run(run(args, face))
    for f in failures[:20]:
        print("FAIL", f)
    print(f"openai {openai.__version__}: load test {'OK' if not failures else f'{len(failures)} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
