"""Record llama.cpp's tokenizer and greedy-decoding output as golden JSON files.

Run with the llama.cpp reference environment (never needed to run or test edgert):

    /work/venv-llama/bin/python tests/tools/make_golden.py [--models DIR] [--out tests/golden]
        [--only tokenizer|model] [--model KEY ...]

Outputs, one per model key (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b):

tests/golden/tokenizer-<key>.json
    model, file, sha256 (of the GGUF file), llama_cpp (llama-cpp-python version), vocab_size, bos_id,
    eos_id, add_bos (llama_vocab_get_add_bos), eog_ids (every id with llama_vocab_is_eog), cases: a list of
    {"text": str,
     "ids": llama_tokenize(text.encode(), add_special=False, parse_special=True),
     "detok": llama_detokenize(ids, remove_special=False, unparse_special=True) decoded as UTF-8
              (errors="replace"),
     "detok_plain": llama_detokenize(ids, remove_special=True, unparse_special=False), same decoding}.
    `llama_detokenize` is the C API with a buffer large enough for any piece; llama-cpp-python's own
    `Llama.detokenize` uses a 32-byte per-piece buffer and silently corrupts longer pieces.

tests/golden/model-<key>.json
    model, file, sha256, llama_cpp, settings (Llama() arguments), definitions (the text below), and
    prompts: a list of
    {"name": short label (the "chat" prompt is one user question; chat_template_source says how it was
             rendered: the GGUF's Jinja template, or llama.cpp's built-in one where the GGUF has none),
     "text": the prompt text fed to the tokenizer (chat prompts are already rendered),
     "prompt_ids": llama_tokenize(text, add_special=True (model's add_bos), parse_special=True),
     "greedy": 48 ids. Greedy decoding one token at a time: eval(prompt_ids), then repeat 48 times:
               t = argmax(logits of the last evaluated position) (lowest id on ties), eval([t]).
               End-of-generation tokens are not special-cased: decoding always runs 48 steps.
     "top1", "top2", "gap": 48 entries each. After a reset, prompt_ids + greedy are evaluated in one
               batch with logits for every position; for i in 0..47 the logits row at position
               len(prompt_ids) - 1 + i (the row that predicts greedy[i]) gives top1 = argmax id,
               top2 = id of the second largest logit, gap = logit[top1] - logit[top2] (float32
               logits, difference computed in float64).}
    top1 can differ from greedy where the batched and one-at-a-time evaluations differ numerically (seen
    with gaps up to ~0.2 on these Q4 models); the gap says how close the call was. Weights are loaded with
    use_extra_bufts=False (no AMX/repacked matmuls; see no_extra_buffer_types).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import random
import runpy
import sys
from pathlib import Path

import numpy as np

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct.gguf",
}

N_GREEDY = 48

LONG_1 = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology and includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. These concepts are implicit in concrete practices such as "
    "one-to-one correspondence, the basis of counting, and comparison to a standard, used for "
    "measurement. Eventually, the concept of numbers became concrete and familiar enough for counting to "
    "arise, at times with sing-song mnemonics to teach sequences to others."
)
LONG_2 = (
    "def quicksort(xs: list[int]) -> list[int]:\n"
    '    """Sort a list of integers; returns a new list."""\n'
    "    if len(xs) <= 1:\n"
    "        return xs\n"
    "    pivot, *rest = xs\n"
    "    left = [x for x in rest if x < pivot]\n"
    "    right = [x for x in rest if x >= pivot]\n"
    "    return quicksort(left) + [pivot] + quicksort(right)\n\n\n"
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self._items = []\n\n"
    "    def push(self, item):\n"
    "        self._items.append(item)\n\n"
    "    def pop(self):\n"
    "        return self._items.pop()\n"
)
LONG_3 = (
    "人工智能（英语：artificial intelligence，缩写为AI）亦称机器智能，指由人制造出来的机器所表现出来的智能。"
    "通常人工智能是指用普通计算机程序来呈现人类智能的技术。该词也指出研究这样的智能系统是否能够实现，"
    "以及如何实现。同时，通过医学、神经科学、机器人学及统计学等的进步，常态预测则认为人类的很多职业也逐渐被其取代。"
)
LONG_4 = (
    "Москва — столица России, город федерального значения, административный центр Центрального "
    "федерального округа и центр Московской области, в состав которой не входит. Крупнейший по "
    "численности населения город России и её субъект — 13 149 803 человек (2024)."
)

BASE_STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\n\n\n\n",
    " \n",
    "\n ",
    "\r\n",
    "a",
    "A",
    " a",
    "  a",
    "Hello",
    "Hello world",
    " Hello world",
    "Hello, world!",
    "hello world.  Goodbye   world.",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "I'm sure it's fine; we'll see what they've done, and you'd agree they're right.",
    "I'M SURE IT'S FINE, WE'LL SEE, THEY'VE, YOU'D, THEY'RE",
    "don't won't can't shouldn't y'all 'tis o'clock rock'n'roll",
    "'s 'S 'll 'LL 're 've 'm 'd 't",
    'She said, "Well... I don\'t know!" -- and left.',
    "Mr. O'Neil paid $3.50 for 2 apples (that's 1.75 each).",
    "e.g. i.e. etc. vs. a.m. p.m.",
    "Punctuation: !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "semicolon; colon: dash - en–dash em—dash … ellipsis",
    "«guillemets» „low-high“ “curly” ‘single’",
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345",
    "123456",
    "1234567",
    "12345678",
    "123456789",
    "1234567890",
    "3.14159265358979323846",
    "-273.15",
    "1,000,000",
    "1e-9 6.022e23 0x1F 0b1010 0o777",
    "2024-06-01T12:34:56Z",
    "+1 (555) 123-4567",
    "Version 1.2.3-rc.4+build.5",
    "٠١٢٣٤٥٦٧٨٩",
    "१२३४५",
    "½ ¾ ² ³ Ⅻ ⑤",
    "https://www.example.com/path/to/page?query=1&lang=en#section-2",
    "mailto:someone@example.org",
    "git clone git@github.com:ggml-org/llama.cpp.git",
    "C:\\Users\\name\\Documents\\file.txt",
    "/usr/local/bin/python3 -m pip install --upgrade numpy==2.0.0",
    "print('hello, world')",
    "for i in range(10):\n    print(i ** 2)",
    "def f(x):\n\treturn x + 1\n",
    "if (x > 0 && y < 10) { return x * y; } else { return -1; }",
    '#include <stdio.h>\n\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}',
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(2, 3)}`);",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    '<html><body><div class="main"><p>Hi</p></div></body></html>',
    "<table><tr><td>cell</td></tr></table>",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "key: value\nlist:\n  - one\n  - two\n",
    'func main() {\n\tfmt.Println("hello")\n}',
    'public static void main(String[] args) { System.out.println("Hi"); }',
    "x = [i for i in range(100) if i % 3 == 0]  # comment",
    "    indented with four spaces",
    "\t\ttwo tabs",
    "\t \t mixed \t whitespace \t",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "a\n\n\n\n\n\n\n\n\n\nb",
    "word" + " " * 40 + "word",
    "x" + "\n" * 35 + "y",
    "tabs" + "\t" * 33 + "end",
    "-" * 60,
    "=" * 17 + " heading " + "=" * 17,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ababababababababababababababababab",
    "你好，世界！",
    "我爱自然语言处理。今天天气很好。",
    "日本語のテキストです。東京は日本の首都です。",
    "カタカナとひらがなと漢字",
    "한국어 텍스트입니다. 서울은 대한민국의 수도입니다.",
    "مرحبا بالعالم! هذه جملة باللغة العربية.",
    "שלום עולם",
    "Привет, мир! Как дела?",
    "Ελληνικά: Γειά σου Κόσμε",
    "नमस्ते दुनिया, यह हिंदी में एक वाक्य है।",
    "বাংলা ভাষা",
    "ภาษาไทย สวัสดีครับ",
    "Tiếng Việt có dấu: Xin chào thế giới",
    "Ünïcödé àccénts: café naïve résumé Zürich Ørsted Łódź",
    "ß ẞ ﬁ ﬂ İ ı",
    "e\u0301 (combining acute) vs é (precomposed)",
    "Emoji: 😀 😃 😄 😁 😆",
    "👍🏽 thumbs up with skin tone",
    "👨‍👩‍👧‍👦 family ZWJ sequence",
    "🏳️‍🌈 flag and 🇺🇸 🇯🇵 regional indicators",
    "❤️ ✨ ⭐ ☕ ⚡",
    "mixed 中文 English 日本語 한국어 العربية русский",
    "zero\u200bwidth\u200bspace and\u00a0nbsp and\u3000ideographic space",
    "soft\u00adhyphen and \ufeffBOM inside",
    "control chars: \x01\x02\x1b[0m",
    "math: ∀x ∈ ℝ, ∃y: x² + y² ≤ 1 → ∑ᵢ aᵢ ≠ ∞",
    "arrows ← ↑ → ↓ ⇒ ⇔",
    "currency € £ ¥ ₹ ₿ $",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>hello<eos>",
    "<unk> <pad> <mask>",
    "<unused0> and <unused99>",
    "<s> and </s>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    '<tool_call>{"name": "f"}</tool_call>',
    "<repo_name>edgert<file_sep>tokenizer.py",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start|> user",
    "<|im_start",
    "< |im_start| >",
    "<b>bold</b> and <i>italic</i> <code>x</code>",
    "a<|im_end|>\n\n<|im_start|>b",
    " <start_of_turn>  spaced  <end_of_turn> ",
    "Hello\n<start_of_turn>model\nHi!",
    "12 345 6789 000",
    "v1.0 v2.10 v10.100",
    "$100,000.00 and 50% off",
    "ALLCAPS camelCase snake_case kebab-case PascalCase SCREAMING_SNAKE",
    "The year 1999 and the year 2000 and 20000 BC.",
    "call me at 555-0199 or 555 0199",
    "(((nested (parentheses))))",
    "[[1, 2], [3, 4]]",
    "a+b=c; a-b=d; a*b=e; a/b=f",
    "...",
    "?!?!",
    "¿Qué tal? ¡Muy bien!",
    "Füße über Straßen",
    "I\u2019m using a curly apostrophe",
    "tab\tseparated\tvalues\t1\t2\t3",
    "CRLF line\r\nendings\r\n",
    "\u2028line separator\u2029paragraph separator",
    "emoji at end 🎉",
    "🎉",
    "🤖🤖🤖",
    "Ａｌｐｈａ ｆｕｌｌｗｉｄｔｈ １２３",
    "ｶﾀｶﾅ halfwidth",
    LONG_1,
    LONG_2,
    LONG_3,
    LONG_4,
    LONG_1 + "\n\n" + LONG_4 + "\n\n" + LONG_3,
]


def generated_strings() -> list[str]:
    """Deterministic extra cases: number runs, whitespace runs and random mixtures."""
    out = []
    for n in range(1, 25):
        out.append("".join(str((i * 7 + n) % 10) for i in range(n)))
    for n in (1, 2, 3, 5, 8, 16, 31, 32, 33):
        out.append("a" + " " * n + "b")
        out.append(" " * n + "lead")
        out.append("x" + "\n" * n)
    rng = random.Random(1234)
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \n\t.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
        + list("éüßøçñ中文字日本한국ру́сский€😀🎉👍🏽‍")
        + ["'s", "'ll", " the", " and", "<|im_start|>", "<end_of_turn>", "  ", "\n\n", "123", "<b>"]
    )
    for _ in range(60):
        n = rng.randint(1, 40)
        out.append("".join(rng.choice(pool) for _ in range(n)))
    return out


def all_strings() -> list[str]:
    return BASE_STRINGS + generated_strings()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def detokenize(llama_cpp, vocab, ids: list[int], remove_special: bool, unparse_special: bool) -> str:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, -n, remove_special, unparse_special)
    return buf.raw[:n].decode("utf-8", errors="replace")


def make_tokenizer_golden(llama_cpp, key: str, path: Path, out_dir: Path) -> None:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    cases = []
    for text in all_strings():
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "detok": detokenize(llama_cpp, vocab, ids, False, True),
                "detok_plain": detokenize(llama_cpp, vocab, ids, True, False),
            }
        )
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    doc = {
        "model": key,
        "file": path.name,
        "sha256": sha256(path),
        "llama_cpp": llama_cpp.__version__,
        "definitions": __doc__.split("tests/golden/model-")[0].strip(),
        "vocab_size": n_vocab,
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "cases": cases,
    }
    out = out_dir / f"tokenizer-{key}.json"
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{out}: {len(cases)} cases")


def chat_prompt(llama_cpp, llm, question: str) -> tuple[str, str]:
    """One user turn rendered with the model's own Jinja template (llama-cpp-python's Jinja2ChatFormatter,
    the Hugging Face settings); without one, with llama.cpp's built-in template detection."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": question}]
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        vocab = llm._model.vocab
        bos = llama_cpp.llama_vocab_get_text(vocab, llama_cpp.llama_vocab_bos(vocab)).decode()
        eos = llama_cpp.llama_vocab_get_text(vocab, llama_cpp.llama_vocab_eos(vocab)).decode()
        fmt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        return fmt(messages=messages).prompt, "jinja: tokenizer.chat_template"
    msgs = (llama_cpp.llama_chat_message * 1)()
    msgs[0].role = b"user"
    msgs[0].content = question.encode()
    buf = ctypes.create_string_buffer(8192)
    # the gemma-3 GGUF carries no template; llama.cpp's built-in "gemma" one is the model's format
    n = llama_cpp.llama_chat_apply_template(b"gemma", msgs, 1, True, buf, len(buf))
    if n < 0 or n > len(buf):
        raise RuntimeError(f"chat template failed: {n}")
    return buf.raw[:n].decode("utf-8"), "llama.cpp built-in template: gemma"


def no_extra_buffer_types(llama_cpp) -> None:
    """llama.cpp without its repacked AMX buffers (SIGILL in sandboxes): edgert/bench.py's one copy,
    loaded by path because this script's Python need not have edgert installed."""
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "edgert" / "bench.py"))
    bench["no_extra_buffer_types"](llama_cpp)


def make_model_golden(llama_cpp, key: str, path: Path, out_dir: Path) -> None:
    settings = dict(n_ctx=512, n_threads=2, n_batch=512, logits_all=True, seed=0, verbose=False)
    no_extra_buffer_types(llama_cpp)
    llm = llama_cpp.Llama(model_path=str(path), **settings)
    chat_text, chat_source = chat_prompt(
        llama_cpp, llm, "What is the capital of France? Answer in one sentence."
    )
    prompts = [
        ("english", "The old lighthouse keeper climbed the stairs every evening, and"),
        ("code", "def fibonacci(n):\n    "),
        ("chat", chat_text),
        ("list", "Prime numbers: 2, 3, 5, 7, 11,"),
        ("french", "La tour Eiffel est située à Paris. Elle a été construite"),
    ]
    records = []
    for name, text in prompts:
        prompt_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(prompt_ids)
        greedy = []
        for _ in range(N_GREEDY):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            tok = int(np.argmax(row))
            greedy.append(tok)
            llm.eval([tok])
        llm.reset()
        llm.eval(prompt_ids + greedy)
        top1, top2, gap = [], [], []
        for i in range(N_GREEDY):
            row = np.asarray(llm.scores[len(prompt_ids) - 1 + i], dtype=np.float32)
            order = np.argsort(-row, kind="stable")
            top1.append(int(order[0]))
            top2.append(int(order[1]))
            gap.append(float(np.float64(row[order[0]]) - np.float64(row[order[1]])))
        agree = sum(a == b for a, b in zip(top1, greedy, strict=True))
        print(f"  {key}/{name}: {len(prompt_ids)} prompt ids, batch top1 == greedy at {agree}/{N_GREEDY}")
        records.append(
            {
                "name": name,
                "text": text,
                "prompt_ids": prompt_ids,
                "greedy": greedy,
                "top1": top1,
                "top2": top2,
                "gap": gap,
            }
        )
    doc = {
        "model": key,
        "file": path.name,
        "sha256": sha256(path),
        "llama_cpp": llama_cpp.__version__,
        "settings": {**{k: v for k, v in settings.items() if k != "verbose"}, "use_extra_bufts": False},
        "definitions": "tests/golden/model-" + __doc__.split("tests/golden/model-")[1].strip(),
        "chat_template_source": chat_source,
        "prompts": records,
    }
    out = out_dir / f"model-{key}.json"
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {len(records)} prompts")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/work/dl/models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "golden")
    ap.add_argument("--only", choices=["tokenizer", "model"])
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="default: all")
    args = ap.parse_args(argv)

    import llama_cpp

    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.model or list(MODELS):
        path = args.models / MODELS[key]
        if not path.exists():
            print(f"missing {path}", file=sys.stderr)
            return 1
        if args.only in (None, "tokenizer"):
            make_tokenizer_golden(llama_cpp, key, path, args.out)
        if args.only in (None, "model"):
            make_model_golden(llama_cpp, key, path, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
