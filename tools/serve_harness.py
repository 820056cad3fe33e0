"""What tools/openai_client_check.py and tools/load_test.py share: a `facellm serve` process on loopback
(port 0, the address read from its first line), the demo model saved to a folder, and `facellm generate`
greedy answers as the reference. Loopback only; every process started here is stopped here.
"""
import base64
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Loopback only: never route these requests through a proxy from the environment.
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ.pop("HTTP_PROXY", None)
os.environ.pop("http_proxy", None)
os.environ.pop("ALL_PROXY", None)
os.environ.pop("all_proxy", None)
MODEL_NAME = "facellm-demo"


def default_binary():
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "facellm"
        if p.exists():
            return str(p)
    raise SystemExit("no facellm binary: run `cargo build --release` or pass --facellm")


def demo_model(binary, folder, gpu_shapes=False):
    """The demo model (same weights as `serve --model demo`) and its bundled face photo, saved to `folder`;
    `gpu_shapes`: the variant with head dims 64 that the CUDA kernels take."""
    subprocess.run([binary, "--quiet", "demo", "--max-new-tokens", "1", "--save-model", folder, "--output", "json",
                    *(["--gpu-shapes"] if gpu_shapes else [])],
                   check=True, stdout=subprocess.DEVNULL)
    return Path(folder) / "pd_astronaut_eileen_collins.jpg"


def data_url(path):
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def cli_generate(binary, model_dir, prompt, max_tokens, image=None):
    """`facellm generate` greedy: {text, prompt_tokens, completion_tokens, finish_reason}."""
    cmd = [binary, "--quiet", "generate", "--model", str(model_dir), "--prompt", prompt,
           "--max-new-tokens", str(max_tokens), "--temperature", "0", "--output", "json"]
    if image:
        cmd += ["--image", str(image)]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    return {"text": out["text"], "prompt_tokens": len(out["prompt_ids"]),
            "completion_tokens": len(out["generated_ids"]), "finish_reason": out["finish_reason"]}


def messages(prompt, image=None):
    if image is None:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": prompt}]}]


@contextmanager
def server(binary, model_dir, *extra):
    """Yields the base URL (http://127.0.0.1:PORT) of a running `facellm serve`; SIGTERM on exit."""
    cmd = [binary, "--quiet", "serve", "--model", str(model_dir), "--served-model-name", MODEL_NAME,
           "--host", "127.0.0.1", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if "http://" not in line:
            raise SystemExit(f"facellm serve did not start: {line!r}")
        yield "http://" + line.split("http://", 1)[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metric(base, name):
    """A value from /metrics (the line `name value`)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def wait_metric(base, name, pred, timeout=30.0):
    t0 = time.monotonic()
    while True:
        v = metric(base, name)
        if pred(v) or time.monotonic() - t0 > timeout:
            return v
        time.sleep(0.05)


def tempdir():
    return tempfile.TemporaryDirectory(prefix="facellm-serve-")
