"""The official `openai` Python client against `facellm serve` (tiny demo model, loopback): a
non-streaming and a streaming answer, each equal to `facellm generate`'s greedy output for the same input
(an image question and a text-only one), usage counts right, and an OpenAI error raised as the client's
typed exception. Exits 1 on any mismatch.

    tools/.venv/bin/python tools/openai_client_check.py [--facellm target/release/facellm]
"""
import argparse
import sys

import openai
from openai import OpenAI

import serve_harness as h


def check(cond, what, failures):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facellm", default=None, help="facellm binary (default target/release, else target/debug)")
    args = ap.parse_args()
    binary = args.facellm or h.default_binary()
    failures = []
    with h.tempdir() as d:
        face = h.demo_model(binary, d)
        cases = [("Describe the facial expression of this person.", face, 24), ("Hello, who are you?", None, 16)]
        refs = [h.cli_generate(binary, d, p, n, img) for p, img, n in cases]
        with h.server(binary, d, "--api-key", "sk-local") as base:
            client = OpenAI(base_url=base + "/v1", api_key="sk-local", max_retries=0, timeout=300)
            check([m.id for m in client.models.list().data] == [h.MODEL_NAME], "models.list names the model", failures)
            for (prompt, img, n), ref in zip(cases, refs):
                kind = "image" if img else "text"
                r = client.chat.completions.create(model=h.MODEL_NAME, messages=h.messages(prompt, img),
                                                   max_tokens=n, temperature=0)
                c = r.choices[0]
                check(c.message.content == ref["text"], f"{kind}: non-streaming text equals facellm generate", failures)
                check(c.finish_reason == ref["finish_reason"], f"{kind}: finish_reason {c.finish_reason}", failures)
                u = r.usage
                check((u.prompt_tokens, u.completion_tokens, u.total_tokens) ==
                      (ref["prompt_tokens"], ref["completion_tokens"], ref["prompt_tokens"] + ref["completion_tokens"]),
                      f"{kind}: usage {u.prompt_tokens}+{u.completion_tokens}={u.total_tokens}", failures)

                stream = client.chat.completions.create(model=h.MODEL_NAME, messages=h.messages(prompt, img),
                                                        max_completion_tokens=n, temperature=0, stream=True,
                                                        stream_options={"include_usage": True})
                text, finish, usage = "", None, None
                for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                    if chunk.usage:
                        usage = chunk.usage
                check(text == ref["text"], f"{kind}: streaming text equals facellm generate", failures)
                check(finish == ref["finish_reason"], f"{kind}: streaming finish_reason {finish}", failures)
                check(usage is not None and (usage.prompt_tokens, usage.completion_tokens) ==
                      (ref["prompt_tokens"], ref["completion_tokens"]), f"{kind}: streaming usage {usage}", failures)
                details = getattr(usage, "prompt_tokens_details", None)
                print(f"     the same prompt again (streaming): {getattr(details, 'cached_tokens', None)} prompt tokens "
                      "from the prefix cache")
            try:
                client.chat.completions.create(model="no-such-model", messages=h.messages("hi"), max_tokens=1)
                check(False, "unknown model raises NotFoundError", failures)
            except openai.NotFoundError as e:
                check(e.body.get("code") == "model_not_found", "unknown model raises NotFoundError (model_not_found)",
                      failures)
            try:
                OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
                check(False, "a wrong key raises AuthenticationError", failures)
            except openai.AuthenticationError:
                check(True, "a wrong key raises AuthenticationError", failures)
    print(f"openai {openai.__version__}: {'OK' if not failures else f'{len(failures)} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
