"""`facellm serve --device cuda` on the demo model (its variant with head dims 64, `demo --gpu-shapes`), for the prepared GPU check (tools/gpu_check.sh): the
server's engine with the model, vision tower and KV cache on the GPU. Needs only the Python standard library
(the GPU machine has no network for `pip install openai`; tools/openai_client_check.py covers the client).

Checks, each a failure if it does not hold: 12 concurrent chat completions (text and image, greedy) all
answer 200 with `finish_reason` and usage; a second question about the same image hits the vision cache and
the KV prefix cache (/metrics); every KV block is free again at the end; the server stops on SIGTERM; `facellm chat` on the same device answers two turns, the
second reusing the first's KV blocks (>= 256 tokens). It also
reports how many answers equal `facellm generate` on the CPU (bf16 on the GPU against f32 on the CPU: on
random weights a near-tie may go the other way, so this is counted, not failed) and the
requests/s and median time to first token of the burst.

    python3 tools/gpu_serve_check.py [--facellm target/release/facellm] [--device cuda]

(`--device cpu` runs the same checks on the CPU engine, to try the script without a GPU.)
"""
import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request

import serve_harness as h


def chat(base, msgs, max_tokens, stream=False):
    body = json.dumps({"model": h.MODEL_NAME, "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
                       "stream": stream}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=120) as r:
        if not stream:
            return r.status, json.loads(r.read()), time.monotonic() - t0
        ttft, text = None, ""
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and ttft is None:
                ttft = time.monotonic() - t0
            text += delta
        return r.status, {"text": text}, ttft


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--facellm", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    binary = args.facellm or h.default_binary()
    failures = []
    report = {}
    with h.tempdir() as d:
        face = h.demo_model(binary, d, gpu_shapes=True)
        questions = ["Describe the face.", "How old is this person?", "What is the expression?",
                     "Is the person smiling?", "Describe the hair.", "What colour are the eyes?"]
        cases = [(q, face if i % 2 == 0 else None) for i, q in enumerate(questions)] * 2
        refs = {}
        for q, img in cases[:len(questions)]:
            cmd_ref = h.cli_generate(binary, d, q, 16, img)  # CPU reference for the record
            refs[(q, img is not None)] = cmd_ref["text"]
        extra = ["--device", args.device, "--max-seqs", "8"]
        if args.device == "cuda":
            extra += ["--gpu-memory-fraction", "0.3"]
        with h.server(binary, d, *extra) as base:
            results = [None] * len(cases)

            def one(i):
                q, img = cases[i]
                try:
                    results[i] = chat(base, h.messages(q, img), 16, stream=(i % 3 == 0))
                except Exception as e:  # noqa: BLE001 - reported as a failure below
                    results[i] = e

            t0 = time.monotonic()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            ttfts = []
            same_as_cpu = 0
            for i, r in enumerate(results):
                if isinstance(r, Exception) or r[0] != 200:
                    failures.append(f"request {i}: {r}")
                    continue
                status, body, t = r
                if "choices" in body:
                    c = body["choices"][0]
                    text = c["message"]["content"]
                    if c.get("finish_reason") not in ("stop", "length") or body["usage"]["completion_tokens"] < 1:
                        failures.append(f"request {i}: finish/usage {c.get('finish_reason')} {body['usage']}")
                else:
                    text = body["text"]
                    if t is not None:
                        ttfts.append(t)
                q, img = cases[i]
                same_as_cpu += text == refs[(q, img is not None)]
            report["requests"] = len(cases)
            report["requests_per_s"] = len(cases) / wall
            report["stream_ttft_p50_ms"] = sorted(ttfts)[len(ttfts) // 2] * 1e3 if ttfts else None
            report["answers_equal_to_cpu_generate"] = same_as_cpu
            # A later question about the same face: vision cache and prefix cache hits.
            vis0 = h.metric(base, "facellm_vision_cache_hits_total")
            pre0 = h.metric(base, "facellm_prefix_cache_hits_total")
            status, _, _ = chat(base, h.messages("One more question about the face?", face), 8)
            report["vision_hits_added"] = h.metric(base, "facellm_vision_cache_hits_total") - vis0
            report["prefix_hits_added"] = h.metric(base, "facellm_prefix_cache_hits_total") - pre0
            if status != 200 or report["vision_hits_added"] < 1 or report["prefix_hits_added"] < 1:
                failures.append(f"same-image follow-up: status {status}, {report}")
            used = h.wait_metric(base, "facellm_kv_blocks_used", lambda v: v == 0, timeout=10)
            report["kv_blocks_used_at_end"] = used
            report["kv_blocks_total"] = h.metric(base, "facellm_kv_blocks_total")
            if used != 0:
                failures.append(f"{used} KV blocks still held after every request ended")
        # `facellm chat` through the same engine: two turns about the face, the second reusing the first's blocks.
        turns = "How old is this person?\nAnd the expression?\n"
        run = subprocess.run([binary, "--quiet", "chat", "--model", d, "--image", str(face), "--device", args.device,
                               "--max-new-tokens", "8", "--output", "json"], input=turns, capture_output=True,
                              text=True, timeout=120)
        answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        report["chat"] = [{k: a.get(k) for k in ("finish_reason", "prompt_tokens", "reused_tokens")} for a in answers]
        if run.returncode != 0 or len(answers) != 2 or answers[1].get("reused_tokens", 0) < 256:
            failures.append(f"chat --device {args.device}: exit {run.returncode}, {report['chat']}, "
                            f"stderr {run.stderr[-500:]!r}")
    report["device"] = args.device
    report["failures"] = failures
    print(json.dumps(report, indent=1))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
