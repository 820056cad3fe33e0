"""Reference fixtures for the tokenizer, chat templates and processor prompt expansion.

How it was run (from the repository root, CPU only, about 30 s):

    tools/.venv/bin/python tools/fixtures_tokenizer.py

with the reference environment of tools/requirements.txt (transformers 5.17.0, tokenizers 0.23.3, torch 2.11.0,
torchvision 0.26.0). It reads the bundled tokenizer folder assets/tokenizer/internvl3_hf/ (checked byte-identical to
../shared/data/tokenizer/qwen2_bpe/ for vocab.json, merges.txt and the chat template) and writes the files under
tests/fixtures/tokenizer/, which are committed; the Rust tests never run Python.

What it records, and why each part exists:
  * encode.json   token ids of >= 300 strings through HF's Qwen2Tokenizer loaded from the bundled folder (the same
                  path transformers takes for an InternVL3-hf checkpoint without tokenizer.json), and the decode of
                  those ids with and without skip_special_tokens; plus decode-only id lists that split UTF-8
                  sequences, so lossy decoding is pinned down too.
  * chat.json     InternVLProcessor.apply_chat_template(tokenize=True) input_ids for image+prompt conversations
                  (run-length encoded), the rendered text before expansion, and the number of tiles per image.
                  The images are those of tests/fixtures/images/ (the image tests' copies); messages store names.
  * qwen25.json   the Qwen2.5-Instruct template (tests/fixtures/tokenizer/qwen25_instruct/tokenizer_config.json)
                  rendered and tokenized by the HF tokenizer, including its default system prompt and tools.
  * jinja.json    small templates rendered by transformers' own Jinja setup (render_jinja_template), covering the
                  environment options the Rust side must copy: trim_blocks, lstrip_blocks, loop controls, tojson,
                  raise_exception, Python string/dict methods, trailing newlines.
"""

import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
ASSET = ROOT / "assets" / "tokenizer" / "internvl3_hf"
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
# Images shared with the image preprocessing tests (tests/fixtures/images/, provenance in its fixtures); only their
# tile counts matter here: 300x300 -> 1 tile, 2048x1536 -> 4x3 grid + thumbnail, 640x376 -> 3x2 + thumbnail.
IMAGE_DIR = ROOT / "tests" / "fixtures" / "images"
IMAGES = ["fairface_repo_race_Asian_face0.jpg", "gen_large_2048x1536.jpg", "pd_obama_biden_two_people.jpg"]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rle(ids):
    """[[id, count], ...]: image prompts hold thousands of repeated <IMG_CONTEXT> ids."""
    out = []
    for i in ids:
        if out and out[-1][0] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def dump(name, obj):
    path = OUT / name
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def check_assets():
    src = SHARED / "tokenizer" / "qwen2_bpe"
    for a, b in [("vocab.json", "vocab.json"), ("merges.txt", "merges.txt"),
                 ("chat_template.jinja", "internvl3_hf_chat_template.jinja")]:
        assert sha(ASSET / a) == sha(src / b), f"{a} differs from shared {b}"


def check_added_tokens(tok):
    table = json.loads((SHARED / "tokenizer" / "qwen2_bpe" / "internvl3_added_tokens.json").read_text())
    expected = {t["id"]: (t["content"], t["special"]) for t in table["added_tokens"]}
    expected[151674] = ("<video>", True)
    got = {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}
    assert got == expected, f"added tokens differ: {set(got.items()) ^ set(expected.items())}"
    for i, (content, _) in expected.items():
        assert tok.convert_tokens_to_ids(content) == i
        assert tok.encode(content) == [i], content
    assert list(range(151643, 151675)) == sorted(expected)
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token is None
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (151665, 151666, 151667)
    return [{"id": i, "content": c, "special": s} for i, (c, s) in sorted(expected.items())]


def strings():
    s = [
        # ASCII prose, punctuation, casing
        "", " ", "Hello", "Hello world", "Hello, world!", "hello world.", "HELLO WORLD", "The quick brown fox jumps over the lazy dog.",
        "Describe the face image based on visual information.", "What is the person's age, gender and ethnicity?",
        "a", "A", "ab", "I", "i", "x y z", "foo_bar baz-qux", "e.g. i.e. etc.", "U.S.A.", "Mr. Smith's dog",
        "!!!", "???", "...", "--", "---", "(parenthesis)", "[brackets]", "{braces}", "<angle>", "\"quoted\"", "'single'",
        "`backtick`", "@user #tag $5 %20 ^ & * ~", "a+b=c", "1/2", "50%", "C++ and C#", "email@example.com",
        "https://huggingface.co/OpenGVLab/InternVL3-1B-hf?x=1&y=2#frag", "path/to/file.txt", "C:\\Windows\\System32",
        # contractions, including upper-case forms the (?i:) group must catch
        "don't", "DON'T", "It's", "IT'S", "it'S", "I'm", "I'M", "we're", "WE'RE", "they've", "THEY'VE", "you'll",
        "YOU'LL", "he'd", "HE'D", "can't won't shouldn't", "'s", "'S", "'t 're 've 'm 'll 'd", "O'Neil's", "rock 'n' roll",
        "dogs' bones", "'quoted'", "It’s curly", "l'homme", "'''", "x's's's",
        # digits: every digit is its own pre-token
        "0", "7", "42", "123", "2024", "3.14159", "1,000,000", "1e10", "-17", "+33 6 12 34 56 78",
        "12345678901234567890", "99999999999999999999999999999999", "0.000000001", "v1.2.3", "ID: 151667", "age 20-29",
        "٣٤٥", "一二三", "①②③", "¹²³", "Ⅻ", "１２３",
        # whitespace runs, tabs, newlines, CRLF, trailing spaces
        "  ", "   ", "    leading", "trailing    ", "a  b", "a   b", "a    b", "\t", "\t\t", "a\tb", "\ttab start",
        "\n", "\n\n", "\n\n\n", "a\nb", "a\n\nb", "line1\nline2\n", "\r\n", "a\r\nb", "a\r\n\r\nb", "\r", "a\rb",
        " \n ", "  \n  ", "a \n b", "a\n \nb", "end with space ", "end with spaces   ", "end with newline\n",
        " \t \n \r\n ", "x\n\n\n\ny", "   \n", "\n   ", "\u00a0nbsp\u00a0", "a\u2003em\u2003space", "\u3000ideographic\u3000",
        "\x0b\x0c", "zero\u200bwidth", "\ufeffbom",
        # CJK, Japanese, Korean, other scripts
        "你好", "你好，世界！", "我是一个人工智能助手。", "这张脸的年龄是多少？", "你是书生·万象，英文名是InternVL。",
        "日本語のテキスト", "カタカナ", "ひらがな", "漢字とかな", "안녕하세요", "한국어 텍스트입니다",
        "Привет, мир!", "Ελληνικά", "العربية", "مرحبا بالعالم", "עברית", "हिन्दी", "ภาษาไทย", "Tiếng Việt", "Türkçe ığüşöç",
        "Ärger über Öl", "naïve café résumé", "Ångström", "straße", "ﬁ ligature", "Ǆ ǅ ǆ",
        # emoji, ZWJ sequences, flags, skin tones, variation selectors
        "😀", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "☺︎", "🙂 smile", "face 😊 image", "🧑🏿‍🦱",
        "🤖🤖🤖🤖🤖🤖🤖🤖", "emoji at end 🎉", "🎉 emoji at start", "mixed 中文 and English 😀 123",
        # combining characters: NFC composes these before BPE
        "e\u0301", "cafe\u0301", "A\u030a", "n\u0303", "o\u0308", "u\u0308ber", "a\u0300\u0301", "\u0301alone",
        "Cafe\u0301 Ame\u0301lie", "\u1100\u1161\u11a8", "\u0915\u094d\u0937", "Z\u0351\u036b\u0343\u036a\u0302algo",
        "\u212b", "\u2126", "\u00c5", "\u0041\u030a\u0301",
        # code
        "def f(x):\n    return x * 2\n", "fn main() {\n\tprintln!(\"hi\");\n}", "if (a && b || !c) { x += 1; }",
        "for i in range(10):\n\tprint(i)", "#include <stdio.h>", "## heading", "# comment", "// comment", "/* block */",
        "<div class=\"x\">text</div>", "SELECT * FROM t WHERE id = 1;", "x = [1, 2, 3]; y = {'a': 1}",
        "lambda x: x**2", "a->b::c", "std::vector<int> v;", "    indented code\n        more", "\"\"\"docstring\"\"\"",
        "{\"gender\": \"Male\", \"age_range\": \"20-29\", \"confidence\": {\"age\": 0.8}}", "key: value\nlist:\n  - item",
        "$ cargo test --release", "0x1F600 0b1010 0o777", "a!=b a==b a<=b a>=b", "<<<>>>", "```rust\nlet x = 1;\n```",
        # special tokens inline (matched as added tokens, not split)
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "text<|im_end|>more", "<|im_end|><|im_end|>", "<|endoftext|>Hello", "Hello<|endoftext|>", " <|im_end|> ",
        "<|object_ref_start|>x<|object_ref_end|>", "<|box_start|>(1,2)<|box_end|>", "<|vision_start|><|image_pad|><|vision_end|>",
        "<tool_call>{}</tool_call>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "<|repo_name|>x<|file_sep|>y",
        "<quad></quad><ref>r</ref><box>b</box>", "<video>", "Frame1: <video>",
        # image tokens inline
        "<img>", "</img>", "<IMG_CONTEXT>", "<img><IMG_CONTEXT></img>", "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\n",
        "<img><IMG_CONTEXT></img>\nDescribe the face.", "Image-1: <img><IMG_CONTEXT></img>\nImage-2: <img><IMG_CONTEXT></img>\n",
        "x<IMG_CONTEXT>y", " <IMG_CONTEXT> ", "<IMG_CONTEXT>\n<IMG_CONTEXT>\n",
        # look-alikes that must NOT match added tokens
        "<|im_end", "|im_end|>", "<|im_end |>", "< |im_end|>", "<|IM_END|>", "<img >", "<IMG>", "<Img>", "</IMG>",
        "<img_context>", "<IMG_CONTEXT", "IMG_CONTEXT>", "<image>", "<image>\nDescribe", "<<img>>", "<|<|im_end|>|>",
        "<|endoftext|", "<video >", "<|im_start|", "<|unknown_token|>", "<s></s>", "[INST] hi [/INST]", "<unk>", "<pad>",
        # invalid-looking / unusual text
        "\x00", "a\x00b", "\x01\x02\x03", "\x7f", "\ufffd", "\ufffd\ufffd", "\U0001f600\ufffd", "\ue000", "\U000f0000",
        "\u0600", "\u202e reversed", "\u2028line sep", "\u2029para sep", "\x85next line", "¬¬¬", "ÿþ", "Ā ā Ă",
        "\\n literal backslash n", "\\u00e9", "%s %d {} {0}", "{{ jinja }}", "{% raw %}", "NaN Infinity null",
        "a" * 64, "ab" * 40, " " * 33, "\n" * 20, "-" * 50, "=" * 50, "😀" * 10, "你" * 30, "1" * 50,
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua.",
    ]
    # Seeded random mixtures of the hard pieces, so pre-tokenizer boundaries get combined in ways nobody wrote.
    rng = random.Random(20261126)
    pieces = ["a", "Z", "'s", "'S", " ", "  ", "\t", "\n", "\r\n", "1", "23", "中", "文", "😀", "👍🏽", "é", "e\u0301",
              "<|im_end|>", "<IMG_CONTEXT>", "<img>", ".", ",", "!?", "(", ")", "_", "-", "Ω", "ß", "\u00a0", "x", "Hello",
              " world", "://", "ABC", "\ufffd", "#", "$", "é'LL"]
    for _ in range(70):
        s.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 14))))
    seen, out = set(), []
    for x in s:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def decode_only_cases(tok, rng):
    """Id lists whose bytes do not form whole characters on their own: decode must be lossy like HF's."""
    cjk = tok.encode("你好世界😀👍🏽中文")
    byte_ids = [tok.convert_tokens_to_ids(t) for t in ["ä", "¸", "½", "å", "¥", "½", "ð", "Ł", "ĺ", "Ģ"]]
    cases = [cjk, cjk[:1], cjk[1:], cjk[:-1], byte_ids, byte_ids[:1], byte_ids[:2], byte_ids[1:3], byte_ids[6:9],
             [byte_ids[0], 151645, byte_ids[1]], [151644, 151645, 151667, 151657, 151674], [151665] + byte_ids[6:8] + [151666]]
    for _ in range(20):
        n = rng.randint(1, 12)
        cases.append([rng.randrange(0, 151675) for _ in range(n)])
    return [{"ids": ids, "decoded": tok.decode(ids), "decoded_skip": tok.decode(ids, skip_special_tokens=True)}
            for ids in cases]


def encode_fixtures(tok, added):
    rng = random.Random(7)
    cases = []
    for text in strings():
        ids = tok.encode(text)
        assert tok(text)["input_ids"] == ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids),
                      "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    assert len(cases) >= 300, len(cases)
    dump("encode.json", {
        "generator": f"tools/fixtures_tokenizer.py, transformers {transformers.__version__}",
        "added_tokens": added,
        "special_tokens_map": tok.special_tokens_map,
        "cases": cases,
        "decode_only": decode_only_cases(tok, rng),
    })


def make_processor(tok, template, max_patches=12):
    image_processor = GotOcr2ImageProcessor(
        size={"height": 448, "width": 448}, resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
        crop_to_patches=False, min_patches=1, max_patches=max_patches)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                             image_seq_length=256, chat_template=template)


def chat_fixtures(tok, template):
    def img(name):
        return {"type": "image", "path": str(IMAGE_DIR / name)}

    def text(t):
        return {"type": "text", "text": t}

    face, large, two = IMAGES
    prompt = "Describe the face image based on visual information."
    sys_msg = {"role": "system", "content": "You are a helpful face analysis assistant."}
    sys_parts = {"role": "system", "content": [text("You are FaceLLM.")]}
    cases = [
        ("one_image", [{"role": "user", "content": [img(face), text(prompt)]}], True, 12),
        ("one_image_no_gen_prompt", [{"role": "user", "content": [img(face), text(prompt)]}], False, 12),
        ("one_image_system", [sys_msg, {"role": "user", "content": [img(face), text(prompt)]}], True, 12),
        ("system_as_parts", [sys_parts, {"role": "user", "content": [img(large), text("How old?")]}], True, 12),
        ("tiled_image", [{"role": "user", "content": [img(large), text("Who is this?")]}], True, 12),
        ("tiled_image_max4", [{"role": "user", "content": [img(two), text("How many faces?")]}], True, 4),
        ("tiled_image_max1", [{"role": "user", "content": [img(two), text("How many faces?")]}], True, 1),
        ("text_after_image_order", [{"role": "user", "content": [text("Look: "), img(face), text(" and answer.")]}], True, 12),
        ("two_images_one_turn", [{"role": "user", "content": [img(face), img(large), text("Same person?")]}], True, 12),
        ("two_images_system", [sys_msg, {"role": "user", "content": [img(two), img(face), text("Compare.")]}], False, 12),
        ("multi_turn", [
            {"role": "user", "content": [img(face), text(prompt)]},
            {"role": "assistant", "content": [text("A young adult with short black hair.")]},
            {"role": "user", "content": [text("Estimate the age range in JSON.")]},
        ], True, 12),
        ("multi_turn_two_images", [
            sys_msg,
            {"role": "user", "content": [img(large), text("Who?")]},
            {"role": "assistant", "content": "A man in a suit."},
            {"role": "user", "content": [img(face), text("And this one? 你好 😀")]},
            {"role": "assistant", "content": [text("A young woman.")]},
        ], False, 12),
        ("text_only_string_content", [{"role": "user", "content": "Hello there!"}], True, 12),
    ]
    out = []
    for name, messages, gen, max_tiles in cases:
        proc = make_processor(tok, template, max_patches=max_tiles)
        rendered = proc.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        enc = proc.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True,
                                       return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        images = [p["path"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
        tiles = []
        for path in images:
            r = proc.image_processor(images=[path], crop_to_patches=True, max_patches=max_tiles, return_tensors="pt")
            tiles.append(int(r["num_patches"][0]))
        if images:
            assert enc["pixel_values"].shape[0] == sum(tiles)
        assert ids.count(151667) == 256 * sum(tiles)
        # Messages as the Rust side reads them: image parts carry only the file name.
        stored = json.loads(json.dumps(messages))
        for m in stored:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    if p["type"] == "image":
                        p["path"] = Path(p["path"]).name
        out.append({"name": name, "messages": stored, "add_generation_prompt": gen, "max_tiles": max_tiles,
                    "num_tiles": tiles, "rendered": rendered, "ids_rle": rle(ids)})
    dump("chat.json", {"generator": f"tools/fixtures_tokenizer.py, transformers {transformers.__version__}",
                       "image_seq_length": 256, "cases": out})


def qwen25_fixtures():
    cfg_dir = OUT / "qwen25_instruct"
    with tempfile.TemporaryDirectory() as tmp:
        for f in ["vocab.json", "merges.txt"]:
            shutil.copyfile(ASSET / f, Path(tmp) / f)
        shutil.copyfile(cfg_dir / "tokenizer_config.json", Path(tmp) / "tokenizer_config.json")
        tok = AutoTokenizer.from_pretrained(tmp)
    tools = [{"type": "function", "function": {
        "name": "get_age", "description": "Estimate the age of the face in an image, in years.",
        "parameters": {"type": "object", "properties": {
            "image_id": {"type": "string", "description": "Image identifier, e.g. \"img_01\"."},
            "unit": {"type": "string", "enum": ["years", "months"]}}, "required": ["image_id"]}}}]
    cases = [
        ("default_system", [{"role": "user", "content": "Hello!"}], True, None),
        ("default_system_no_gen", [{"role": "user", "content": "Hello!"}], False, None),
        ("own_system", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 你好"}], True, None),
        ("multi_turn", [
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}], True, None),
        ("tools", [{"role": "user", "content": "How old is img_01?"}], True, tools),
        ("tool_call_round_trip", [
            {"role": "user", "content": "How old is img_01?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_age", "arguments": {"image_id": "img_01"}}}]},
            {"role": "tool", "content": "{\"age\": 34}"},
            {"role": "tool", "content": "second result"},
        ], True, tools),
    ]
    out = []
    for name, messages, gen, tl in cases:
        rendered = tok.apply_chat_template(messages, tools=tl, add_generation_prompt=gen, tokenize=False)
        ids = tok.apply_chat_template(messages, tools=tl, add_generation_prompt=gen, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        assert ids == tok.encode(rendered)
        out.append({"name": name, "messages": messages, "tools": tl, "add_generation_prompt": gen,
                    "rendered": rendered, "ids": ids})
    dump("qwen25.json", {"generator": f"tools/fixtures_tokenizer.py, transformers {transformers.__version__}",
                         "special_tokens_map": tok.special_tokens_map, "eos_token_id": tok.eos_token_id, "cases": out})


def jinja_fixtures():
    """Template features rendered by transformers' own Jinja environment."""
    msgs = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi, Bob"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me: a,b,c"}]
    templates = [
        ("trim_lstrip_blocks", "{% for m in messages %}\n    {% if m.role == 'user' %}\n  U:{{ m.content }}\n    {% else %}\n  O:{{ m.content }}\n    {% endif %}\n{% endfor %}\n"),
        ("trailing_newline_dropped", "{{ messages[0].role }}\n"),
        ("two_trailing_newlines", "{{ messages[0].role }}\n\n"),
        ("dash_control", "{%- for m in messages -%}\n  [{{- m.role -}}]\n{%- endfor -%}\n!"),
        ("loop_controls", "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}{{ loop.index0 }}={{ m.role }};{% endfor %}"),
        ("loop_vars", "{% for m in messages %}{{ loop.first }}/{{ loop.last }}/{{ loop.length }}/{{ loop.revindex }} {% endfor %}"),
        ("string_methods", "{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.upper() }}|{{ m.content.lower() }}|{{ m.role.title() }}|{{ m.content.startswith('Hi') }}|{{ m.content.endswith('!') }}|{{ m.content.replace(',', ';') }}]{% endfor %}"),
        ("split_join", "{{ messages[3].content.split(': ')[1].split(',') | join('+') }}|{{ messages[0].content.lstrip() }}|{{ messages[0].content.rstrip() }}."),
        ("dict_methods", "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('role') }}{{ messages[0].get('nope', 'dflt') }}{% for k in messages[1].keys() %}<{{ k }}>{% endfor %}"),
        ("tojson_default", "{{ messages | tojson }}"),
        ("tojson_indent", "{{ messages[0] | tojson(indent=2) }}"),
        ("tojson_sort_keys", "{{ {'b': 1, 'a': [1, 2.5, none, true, 'x\"y</tag>', 'é中😀\\n\\t'], 'c': {'z': 1, 'y': 0}} | tojson(sort_keys=true) }}"),
        ("tojson_ensure_ascii", "{{ 'é中😀\x7f' | tojson(ensure_ascii=true) }}"),
        ("namespace", "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.n = ns.n + 1 %}{% set ns.last = m.content %}{% endif %}{% endfor %}{{ ns.n }}:{{ ns.last }}"),
        ("slicing_and_filters", "{{ messages[1:3] | map(attribute='role') | join(',') }}|{{ messages[-1].content[:4] }}|{{ messages | length }}|{{ messages[0].content | trim }}|{{ 'abc'[::-1] }}"),
        ("tests_and_defaults", "{{ messages[0].content is string }}{{ messages is string }}{{ nothing is defined }}{{ nothing | default('d') }}{{ add_generation_prompt }}{% if tools is none %}NT{% endif %}"),
        ("string_concat", "{{ '<|im_start|>' + messages[1].role + '\\n' + messages[1].content ~ 1 }}"),
        ("special_token_vars", "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}"),
        ("in_operator", "{{ 'Bob' in messages[1].content }}{{ 'role' in messages[0] }}{{ 'x' not in 'abc' }}"),
        ("python_str_of_values", "{{ [1, 'a', none, true, 2.5, \"it's\"] }}|{{ {'k': 'v', 'n': [none]} }}|{{ none }}|{{ true }}|{{ 10 / 4 }}|{{ 10 / 2 }}|{{ 7 // 2 }}|{{ 2 ** 10 }}|{{ 1.0 }}|{{ 1e20 }}|{{ 0.00001 }}|{{ tools }}|{{ documents }}"),
        ("message_extra_fields", "{% for m in messages %}{{ m.role }}:{{ m.name | default('-') }};{% endfor %}"),
        ("raise_exception", "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"),
        ("syntax_error", "{% for m in messages %}{{ m.role }"),
    ]
    out = []
    for name, template in templates:
        case = {"name": name, "template": template, "messages": msgs, "add_generation_prompt": True,
                "vars": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}}
        try:
            rendered, _ = render_jinja_template([msgs], chat_template=template, add_generation_prompt=True,
                                                **case["vars"])
            case["rendered"] = rendered[0]
        except Exception as e:  # noqa: BLE001 - the error class is what is recorded
            case["error"] = f"{type(e).__name__}: {e}"
        out.append(case)
    dump("jinja.json", {"generator": f"tools/fixtures_tokenizer.py, transformers {transformers.__version__}",
                        "cases": out})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    check_assets()
    tok = AutoTokenizer.from_pretrained(str(ASSET))
    added = check_added_tokens(tok)
    template = (ASSET / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == template
    encode_fixtures(tok, added)
    chat_fixtures(tok, template)
    qwen25_fixtures()
    jinja_fixtures()


if __name__ == "__main__":
    sys.exit(main())
