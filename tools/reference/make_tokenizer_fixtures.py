#!/usr/bin/env python3
"""CLIP tokenizer fixtures: small but real-shaped tokenizer folders and what transformers' CLIPTokenizer makes of
a list of tricky prompts.

diffusers loads a pipeline's `tokenizer/` (and SDXL's `tokenizer_2/`) with the class that model_index.json names,
`transformers.CLIPTokenizer`. In transformers 5 that is the tokenizers-backed (Rust) tokenizer built from
vocab.json + merges.txt: NFC, `\\s+` -> " ", lower-case; the CLIP split regex (Oniguruma); byte-level BPE with
`</w>`; added/special tokens split out first. That is the reference here (there is no slow CLIP tokenizer in 5.x).

The real CLIP vocabulary is not on PyPI as such, but open_clip_torch ships OpenAI's merges
(`bpe_simple_vocab_16e6.txt.gz`); the script downloads that wheel with pip (no dependencies, pinned, checked by
sha256) unless --bpe points at the .gz. From its first --merges merges it builds vocab.json the way CLIP does:
the 256 byte characters, the same with `</w>`, each merge joined, then `<|startoftext|>` and `<|endoftext|>`.

Writes, under --out (default Tests/Fixtures/tokenizers):
  clip_small/         vocab.json, merges.txt and the legacy configs of SD1.x's `tokenizer/` (AddedToken dicts in
                      tokenizer_config.json and special_tokens_map.json; pads with <|endoftext|>)
  clip_small_pad0_tokenizer_json/  clip_small_pad0 as transformers 5 saves it (tokenizer.json only)
  clip_small_pad0/    the same vocabulary with the configs of SDXL's `tokenizer_2/` (added_tokens_decoder with "!"
                      as a special token; pads with "!", id 0)
  clip_config_variants/<name>/
                      config files only (the test copies vocab.json and merges.txt from clip_small beside them):
                      other real-world ways the special tokens are declared
  clip_cases.json     per prompt and folder: `ids` (tokenizer(text), no padding or truncation), `input_ids` and
                      `attention_mask` (padding="max_length", max_length=77, truncation=True), `decoded`
                      (tokenizer.decode(ids)) and `truncated_text` (what diffusers' encode_prompt warns was cut off,
                      or null)
  clip_unicode.json   for every Unicode scalar, how the reference's pre-tokenizer classes it (runs of L letter,
                      N number, S whitespace, P other) and what its normalizer makes of it alone, where that differs

Run through `make fixtures`, or:
    python tools/reference/make_tokenizer_fixtures.py --out Tests/Fixtures/tokenizers
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import tokenizers
import transformers
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MAX_LENGTH = 77


def read_bpe_gz(path):
    data = open(path, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        sys.exit(f"{path}: sha256 {digest}, expected {BPE_SHA256}")
    return gzip.decompress(data).decode("utf-8")


def download_bpe_gz():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", tmp, OPEN_CLIP_WHEEL], check=True)
        wheel = next(os.path.join(tmp, name) for name in os.listdir(tmp) if name.endswith(".whl"))
        with zipfile.ZipFile(wheel) as archive:
            target = os.path.join(tmp, "bpe.txt.gz")
            with open(target, "wb") as f:
                f.write(archive.read(BPE_MEMBER))
        return read_bpe_gz(target)


def clip_vocabulary(bpe_text, merge_count):
    # CLIP's own loader skips the first line (a header) and keeps 49152 - 256 - 2 = 48894 merges.
    lines = bpe_text.split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines[:merge_count]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge produced a token twice"
    return vocab, merges


def added_token(content, normalized, legacy=True, special=None):
    """An AddedToken as transformers 4.x wrote it: with `__type` in tokenizer_config.json (legacy), or as an
    `added_tokens_decoder` entry (with `special`)."""
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    if legacy:
        token["__type"] = "AddedToken"
    else:
        token["special"] = special
    return token


def sd1_configs():
    # As runwayml/stable-diffusion-v1-5's tokenizer/ (transformers 4.2x): AddedToken dicts, normalized true.
    legacy = {
        "add_prefix_space": False,
        "bos_token": added_token("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token("<|endoftext|>", True),
    }
    special_map = {key: ({k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else value)
                   for key, value in legacy.items() if key.endswith("_token")}
    return {"tokenizer_config.json": legacy, "special_tokens_map.json": special_map}


def sdxl_configs(vocab, pad_token):
    # As stabilityai/stable-diffusion-xl-base-1.0's tokenizer/ and tokenizer_2/ (transformers 4.3x): strings plus
    # added_tokens_decoder; tokenizer_2 declares its pad token "!" (id 0) as a special added token.
    decoder = {}
    if pad_token == "!":
        decoder[str(vocab["!"])] = added_token("!", False, legacy=False, special=True)
    decoder[str(vocab["<|startoftext|>"])] = added_token("<|startoftext|>", True, legacy=False, special=False)
    decoder[str(vocab["<|endoftext|>"])] = added_token("<|endoftext|>", False, legacy=False, special=False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [],
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    special_map = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
                   "unk_token": "<|endoftext|>"}
    added = {content["content"]: int(index) for index, content in decoder.items()}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map, "added_tokens.json": added}


def variant_configs(vocab):
    sd1 = sd1_configs()
    # SD2.x style: legacy config, and special_tokens_map.json (which wins in the legacy path) pads with "!".
    sd2_map = dict(sd1["special_tokens_map.json"], pad_token="!")
    # A legacy folder without special_tokens_map.json but with added_tokens.json (transformers 4.x wrote both).
    legacy_added = {"tokenizer_config.json": sd1["tokenizer_config.json"],
                    "added_tokens.json": {"<|startoftext|>": vocab["<|startoftext|>"],
                                          "<|endoftext|>": vocab["<|endoftext|>"]}}
    return {
        "sd2_legacy": {"tokenizer_config.json": sd1["tokenizer_config.json"], "special_tokens_map.json": sd2_map},
        "sdxl_tokenizer": sdxl_configs(vocab, "<|endoftext|>"),
        "legacy_added_tokens_json": legacy_added,
        # Nothing but the class name: every special token takes CLIPTokenizer's defaults.
        "minimal": {"tokenizer_config.json": {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH}},
    }


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_cases(path, header, lists):
    """The header indented, then one line per case and folder, so the file stays small and diffs stay readable."""
    compact = {"ensure_ascii": False, "separators": (",", ":")}
    lines = ["{"] + [f"  {json.dumps(key)}: {json.dumps(value, **compact)}," for key, value in header.items()]
    for list_index, (key, cases) in enumerate(lists.items()):
        lines.append(f"  {json.dumps(key)}: [")
        for case_index, case in enumerate(cases):
            lines.append(f"    {{\"text\": {json.dumps(case['text'], ensure_ascii=False)}, \"results\": {{")
            results = list(case["results"].items())
            for result_index, (name, result) in enumerate(results):
                comma = "," if result_index + 1 < len(results) else ""
                lines.append(f"      {json.dumps(name)}: {json.dumps(result, **compact)}{comma}")
            lines.append("    }}" + ("," if case_index + 1 < len(cases) else ""))
        lines.append("  ]" + ("," if list_index + 1 < len(lists) else ""))
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_configs(folder, configs):
    os.makedirs(folder, exist_ok=True)
    for name, value in configs.items():
        write_json(os.path.join(folder, name), value)


def write_vocabulary(folder, vocab, merges):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for left, right in merges:
            f.write(f"{left} {right}\n")


def long_prompt():
    return ("a highly detailed matte painting of a castle on a hill at sunset, dramatic lighting, volumetric fog, "
            "trending on artstation, by greg rutkowski and alphonse mucha, 8k, octane render, sharp focus, "
            "intricate, elegant, cinematic composition, golden hour, ultra wide angle, hyperrealistic, masterpiece")


PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT Riding A Horse",
    "  lots   of\twhite\t\tspace\nand\r\nnewlines \u3000 ideographic\u00a0nbsp\u2028line sep  ",
    "café naïve Ångström résumé façade",
    "cafe\u0301 A\u030angstro\u0308m (decomposed)",
    "emoji 😀🎉 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 ❤\ufe0f",
    "中文测试：一只猫坐在月球上。",
    "日本語のテキスト、カタカナとひらがな",
    "한국어 텍스트 입니다",
    "ＦＵＬＬ－ＷＩＤＴＨ\u3000ｔｅｘｔ　１２３！",
    "!!!???... a--b (x) [y] {z} 'hello' \"quoted\" ---> <<>>",
    "'s 'll don't I'M we'RE you've she'd 'star o'clock",
    "1234567 3.14 1,000 ٣٤٥ ½ ² ⅷ",
    "<b>bold</b> &amp; <a href=\"x\">link</a> &lt;tag&gt;",
    "before<|endoftext|>after <|startoftext|> x <|ENDOFTEXT|> <|StartOfText|>y",
    "",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "e\u0301\u0302 o\u0308\u0304 z\u0335\u0336 Z\u0351\u0352\u0353\u0354a\u0300",
    "bell\x07 null\x00 esc\x1b del\x7f zero\u200bwidth zwj\u200d bom\ufeff sep\x1c\x1d unit\x1f",
    "İstanbul ΣΊΣΥΦΟΣ straße GROẞE ǅemal ﬁne",
    "hello! wow ! yes!!",
    "x</w>y",
    "!",
    "<|endoftext|>",
    long_prompt(),
    "a " * 75,
    "a " * 76,
    "a " * 74 + "😀😀 end",
]

# Texts for the config variants: the ones whose result depends on how the special tokens are declared.
VARIANT_PROMPTS = [
    "hello! wow ! yes!!",
    "before<|endoftext|>after <|startoftext|> x <|ENDOFTEXT|> <|StartOfText|>y",
    "<|endoftext|>",
    "a photograph of an astronaut riding a horse",
    long_prompt(),
]


def reference(tokenizer, text):
    ids = tokenizer(text).input_ids
    padded = tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    # diffusers' encode_prompt (StableDiffusionPipeline, StableDiffusionXLPipeline): the warning's text.
    untruncated = tokenizer(text, padding="longest").input_ids
    truncated_text = None
    if len(untruncated) >= len(padded.input_ids) and untruncated != padded.input_ids:
        truncated_text = tokenizer.batch_decode([untruncated[tokenizer.model_max_length - 1:-1]])[0]
    return {
        "ids": ids,
        "input_ids": padded.input_ids,
        "attention_mask": padded.attention_mask,
        "decoded": tokenizer.decode(ids),
        "truncated_text": truncated_text,
    }


def unicode_table(tokenizer):
    """How the reference's normalizer and pre-tokenizer treat every scalar, learned by running them."""
    backend = tokenizer.backend_tokenizer
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    byte_encoder = bytes_to_unicode()

    def piece(text):
        return "".join(byte_encoder[b] for b in text.encode("utf-8"))

    runs, normalized, previous = [], {}, None
    for scalar in range(0x110000):
        if 0xD800 <= scalar < 0xE000:
            continue
        c = chr(scalar)
        alone = normalizer.normalize_str(c)
        if alone != c:
            normalized[str(scalar)] = alone
        pieces = [p for p, _ in pre_tokenizer.pre_tokenize_str("ab" + c + c + "12")]
        classes = {
            (piece("ab"), piece("1"), piece("2")): "S",
            (piece("ab" + c + c), piece("1"), piece("2")): "L",
            (piece("ab"), piece(c), piece(c), piece("1"), piece("2")): "N",
            (piece("ab"), piece(c + c), piece("1"), piece("2")): "P",
        }
        kind = classes.get(tuple(pieces))
        assert kind is not None, (hex(scalar), pieces)
        if kind != previous:
            runs.append([scalar, kind])
            previous = kind
    return {"classes": runs, "normalized": normalized}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/tokenizers")
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: downloaded from PyPI's open_clip_torch)")
    parser.add_argument("--merges", type=int, default=3000, help="how many of CLIP's merges the small vocabulary keeps")
    args = parser.parse_args()
    # Long prompts are the point of some cases; transformers' "longer than the maximum" warning is noise here.
    transformers.logging.set_verbosity_error()

    bpe_text = read_bpe_gz(args.bpe) if args.bpe else download_bpe_gz()
    vocab, merges = clip_vocabulary(bpe_text, args.merges)

    folders = {
        "clip_small": sd1_configs(),
        "clip_small_pad0": sdxl_configs(vocab, "!"),
    }
    for name, configs in folders.items():
        folder = os.path.join(args.out, name)
        shutil.rmtree(folder, ignore_errors=True)
        write_vocabulary(folder, vocab, merges)
        write_configs(folder, configs)

    variants_root = os.path.join(args.out, "clip_config_variants")
    shutil.rmtree(variants_root, ignore_errors=True)
    variant_tokenizers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, configs in variant_configs(vocab).items():
            write_configs(os.path.join(variants_root, name), configs)
            # The reference loads the variant exactly as the test assembles it: configs beside clip_small's files.
            folder = os.path.join(tmp, name)
            write_vocabulary(folder, vocab, merges)
            write_configs(folder, configs)
            variant_tokenizers[name] = CLIPTokenizer.from_pretrained(folder)

    tokenizers_by_folder = {name: CLIPTokenizer.from_pretrained(os.path.join(args.out, name)) for name in folders}
    # What transformers 5 itself writes (tokenizer.json + tokenizer_config.json, no vocab.json/merges.txt), as
    # a pipeline saved with today's diffusers holds it; it must tokenize exactly as the folder it came from.
    saved = os.path.join(args.out, "clip_small_pad0_tokenizer_json")
    shutil.rmtree(saved, ignore_errors=True)
    tokenizers_by_folder["clip_small_pad0"].save_pretrained(saved)
    for name, tokenizer in {**tokenizers_by_folder, **variant_tokenizers}.items():
        assert type(tokenizer).__name__ == "CLIPTokenizer" and tokenizer.is_fast, (name, type(tokenizer))
        assert tokenizer.model_max_length == MAX_LENGTH, (name, tokenizer.model_max_length)

    cases = [{"text": text, "results": {name: reference(tokenizer, text)
                                        for name, tokenizer in tokenizers_by_folder.items()}}
             for text in PROMPTS]
    variant_cases = [{"text": text, "results": {name: reference(tokenizer, text)
                                                for name, tokenizer in variant_tokenizers.items()}}
                     for text in VARIANT_PROMPTS]
    write_cases(os.path.join(args.out, "clip_cases.json"), {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer": f"transformers.{type(tokenizers_by_folder['clip_small']).__name__} (is_fast: True)",
        "max_length": MAX_LENGTH,
        "vocab_size": len(vocab),
        "pad_token_ids": {name: t.pad_token_id for name, t in {**tokenizers_by_folder, **variant_tokenizers}.items()},
    }, {"cases": cases, "variant_cases": variant_cases})

    table = unicode_table(tokenizers_by_folder["clip_small"])
    with open(os.path.join(args.out, "clip_unicode.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizers": tokenizers.__version__, **table}, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(vocab)} tokens, {len(merges)} merges, {len(cases)} cases, "
          f"{len(variant_cases)} variant cases")


if __name__ == "__main__":
    main()
