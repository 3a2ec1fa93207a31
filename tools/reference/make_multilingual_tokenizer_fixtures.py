#!/usr/bin/env python3
"""Tokenizer fixtures for PEA's language-specific text encoders: Chinese-CLIP's WordPiece (BertTokenizer) and
multilingual CLIP's XLM-R SentencePiece unigram (XLMRobertaTokenizer), and what transformers 5 makes of a list of
tricky prompts.

References. transformers 5 has one tokenizer per class, backed by the Rust `tokenizers` library:
- `BertTokenizer` (what Chinese-CLIP users load: `BertTokenizer`/`ChineseCLIPProcessor` on the hub folders, and
  diffusers-style pipelines) is BertNormalizer (clean text, CJK spacing, NFD accent stripping, lower-case) +
  BertPreTokenizer (whitespace, punctuation) + WordPiece (`##`, 100 characters per word) + `[CLS] $A [SEP]`.
- `XLMRobertaTokenizer` (what open_clip's `xlm-roberta-large-ViT-H-14` loads for "xlm-roberta-large") rebuilds its
  pipeline in `__init__` from the vocabulary and the SentencePiece `precompiled_charsmap` found in tokenizer.json or
  sentencepiece.bpe.model: Precompiled normalizer, WhitespaceSplit + Metaspace("▁", always), Unigram (unk id 3, no
  byte fallback), `<s> $A </s>`; fairseq ids (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, SentencePiece id + 1, `<mask>`
  last).

Vocabularies. Chinese-CLIP's real vocab.txt (21128 tokens, the RoBERTa-wwm-ext vocabulary) comes from PyPI's cn_clip
wheel (downloaded with `pip download --no-deps`, sha256-checked) unless --cn-clip-wheel points at it. XLM-R's real
sentencepiece.bpe.model (5 MB) is not on PyPI; the script trains a small unigram model with the `sentencepiece`
package on the multilingual text below, with XLM-R's settings (nmt_nfkc normalization, so the same
precompiled_charsmap as XLM-R's, `<unk>`=0 `<s>`=1 `</s>`=2), and lays it out as the hub folder is.

Writes, under --out (default Tests/Fixtures/tokenizers):
  cn_clip/                vocab.txt (cn_clip's), tokenizer_config.json and special_tokens_map.json as a transformers
                          4.x BertTokenizer saves them (do_lower_case true, as cn_clip and Chinese-CLIP use)
  wordpiece_config_variants/<name>/
                          tokenizer_config.json only (the test copies cn_clip/vocab.txt beside it): cased, accents
                          kept, no CJK splitting, cased with accents stripped
  wordpiece_cases.json    per prompt and folder: `ids` (tokenizer(text), no padding or truncation), `input_ids` and
                          `attention_mask` (padding="max_length", max_length=52, truncation=True), `decoded`
                          (decode(ids)), `decoded_skip` (decode(ids, skip_special_tokens=True)), `truncated_text`
                          (the cut ids decoded, as diffusers' warning shows them, or null); `cn_clip` per prompt:
                          cn_clip.clip.tokenize(text) (its own FullTokenizer, context_length 52), for comparison only
  wordpiece_unicode.json  per Unicode scalar, how the reference's BertNormalizer and BertPreTokenizer treat it: runs
                          of classes (X removed, S whitespace, C CJK character, P punctuation, L anything else) and
                          its lower-cased, accent-stripped, and both, forms where they differ (Hangul syllables as a
                          digest; see wordpiece_unicode_table)
  xlmr_small/             sentencepiece.bpe.model, tokenizer.json (as transformers converts it) and
                          tokenizer_config.json (as transformers 4.x saved XLM-R's)
  unigram_cases.json      per prompt: `ids`, `input_ids`/`attention_mask` (padding="max_length", max_length=77,
                          truncation=True), `decoded`, `decoded_skip`, `truncated_text`; the same for the folder
                          loaded with tokenizer.json only and with sentencepiece.bpe.model only (checked equal here)
  unigram_unicode.json    per Unicode scalar, the Precompiled normalizer's output where it differs from the scalar

Run through `make fixtures`, or:
    python tools/reference/make_multilingual_tokenizer_fixtures.py --out Tests/Fixtures/tokenizers
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import sentencepiece
import tokenizers
import transformers
from transformers import BertTokenizer, XLMRobertaTokenizer

CN_CLIP_WHEEL = "cn_clip==1.6.0"
CN_CLIP_VOCAB = "cn_clip/clip/vocab.txt"
CN_CLIP_VOCAB_SHA256 = "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c"
CN_CLIP_TOKENIZER = "cn_clip/clip/bert_tokenizer.py"
WORDPIECE_MAX_LENGTH = 52  # cn_clip's context_length
UNIGRAM_MAX_LENGTH = 77  # open_clip's context_length for xlm-roberta-large-ViT-H-14


# MARK: - Chinese-CLIP (WordPiece)

def cn_clip_files(wheel):
    """cn_clip's vocab.txt (checked) and the source of its own tokenizer, from the wheel."""
    def read(path):
        with zipfile.ZipFile(path) as archive:
            return archive.read(CN_CLIP_VOCAB), archive.read(CN_CLIP_TOKENIZER)

    if wheel:
        vocab, source = read(wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                            "-d", tmp, CN_CLIP_WHEEL], check=True)
            vocab, source = read(next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")))
    digest = hashlib.sha256(vocab).hexdigest()
    if digest != CN_CLIP_VOCAB_SHA256:
        sys.exit(f"{CN_CLIP_VOCAB}: sha256 {digest}, expected {CN_CLIP_VOCAB_SHA256}")
    return vocab, source


def load_cn_clip_tokenizer(source, vocab_path):
    """cn_clip's FullTokenizer (its bert_tokenizer.py, which needs only `six`), or None without `six`."""
    try:
        import six  # noqa: F401
    except ImportError:
        print("six is not installed: skipping the comparison with cn_clip's own tokenizer", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cn_clip_bert_tokenizer.py")
        with open(path, "wb") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("cn_clip_bert_tokenizer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.FullTokenizer(vocab_file=vocab_path, do_lower_case=True)


def cn_clip_tokenize(full_tokenizer, text, context_length=WORDPIECE_MAX_LENGTH):
    """cn_clip.clip.tokenize for one text: [CLS] + ids[:context_length - 2] + [SEP], zero padding."""
    vocab = full_tokenizer.vocab
    ids = [vocab["[CLS]"]] + full_tokenizer.convert_tokens_to_ids(full_tokenizer.tokenize(text))[:context_length - 2]
    ids.append(vocab["[SEP]"])
    return ids + [0] * (context_length - len(ids))


def bert_special_token(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def bert_config(vocab_ids, **overrides):
    """tokenizer_config.json as transformers 4.3x saves a BertTokenizer (Chinese-CLIP's hub folders)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    config = {
        "added_tokens_decoder": {str(vocab_ids[t]): bert_special_token(t) for t in specials},
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": 512,
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    }
    config.update(overrides)
    return config


WORDPIECE_VARIANTS = {
    "cased": {"do_lower_case": False},
    "keep_accents": {"strip_accents": False},
    "no_chinese_split": {"tokenize_chinese_chars": False},
    "cased_strip_accents": {"do_lower_case": False, "strip_accents": True},
}


HANGUL_SYLLABLES = range(0xAC00, 0xD7A4)


def fnv1a64(data, value=0xCBF29CE484222325):
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def wordpiece_unicode_table(tokenizers_by_name):
    """How the reference treats each scalar, learned by running its normalizers and pre-tokenizer on it alone.

    `classes`: runs of X (removed), S (becomes a space), C (CJK: spaced), P (split off by the pre-tokenizer), L (the
    rest), from the cased normalizer. Then, for P and L scalars, what three normalizers make of them where that
    differs from the scalar: `lowercased` (do_lower_case, accents kept), `stripped` (cased, accents stripped) and
    `lowercased_stripped` (cn_clip's). The 11172 Hangul syllables, which NFD decomposes, are left out of the last two
    and summed up by a 64-bit FNV-1a digest of their outputs, each followed by a NUL byte.
    """
    cased = tokenizers_by_name["cased"].backend_tokenizer.normalizer
    pre_tokenizer = tokenizers_by_name["cased"].backend_tokenizer.pre_tokenizer
    normalizers = {"lowercased": tokenizers_by_name["keep_accents"].backend_tokenizer.normalizer,
                   "stripped": tokenizers_by_name["cased_strip_accents"].backend_tokenizer.normalizer,
                   "lowercased_stripped": tokenizers_by_name["cn_clip"].backend_tokenizer.normalizer}
    maps = {name: {} for name in normalizers}
    digests = {name: 0xCBF29CE484222325 for name in normalizers}
    runs, previous = [], None
    for scalar in range(0x110000):
        if 0xD800 <= scalar < 0xE000:
            continue
        c = chr(scalar)
        alone = cased.normalize_str(c)
        if alone == "":
            kind = "X"
        elif alone == " ":
            kind = "S"
        elif alone == f" {c} ":
            kind = "C"
        else:
            assert alone == c, (hex(scalar), alone)
            pieces = [p for p, _ in pre_tokenizer.pre_tokenize_str("a" + c + "b")]
            kind = {("a", c, "b"): "P", ("a" + c + "b",): "L"}.get(tuple(pieces))
            assert kind is not None, (hex(scalar), pieces)
        if kind in "PL":
            for name, normalizer in normalizers.items():
                output = normalizer.normalize_str(c)
                if scalar in HANGUL_SYLLABLES and name != "lowercased":
                    digests[name] = fnv1a64(output.encode("utf-8") + b"\0", digests[name])
                elif output != c:
                    maps[name][str(scalar)] = output
        if kind != previous:
            runs.append([scalar, kind])
            previous = kind
    return {"classes": runs, **maps,
            "hangul_syllables_fnv1a64": {name: f"{digests[name]:016x}" for name in ("stripped", "lowercased_stripped")}}


# MARK: - XLM-R (SentencePiece unigram)

# Training text for the small SentencePiece model: enough scripts that the vocabulary has letters, CJK characters,
# digits and punctuation, and leaves emoji and rarer scripts to <unk>.
CORPUS = """A photograph of an astronaut riding a horse on the moon.
A cat sitting on a wooden table next to a cup of coffee, oil painting, 4k, trending on artstation.
An oil painting of a castle on a hill at sunset, dramatic lighting, volumetric fog.
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!
Is it 12:30 or 3.14 or 1,000,000? 2024-05-01 and 99% (maybe) [yes] {no} "quoted" 'single' - / \\ @ # $ & * + = < > ~ ^ _ |
https://www.example.com/path/to/page.html?query=value&lang=en#section user.name+tag@example.org
Une photo d'un chat assis sur une table en bois, à côté d'une tasse de café. Où est la clé ? Très élégant, naïve façade.
Ein Foto von einem Hund, der im Schnee spielt. Größe, Straße, Äpfel und Bäume über dem Fluss.
Una fotografía de un astronauta montando a caballo en la luna, años después. ¿Dónde está? ¡Qué bonito!
Uma fotografia de um gato na praça, coração e canção. Ångström, résumé, São Paulo, Kraków, İstanbul.
一只猫坐在月球上，旁边是一杯咖啡。中国的山水画，高山流水，云雾缭绕。这是一个美丽的花园，有很多花和树。
一幅美丽的油画：夕阳下的城堡，戏剧性的光线。你好吗？我很好！今天天气很好，我们去公园吧。
宇宙飛行士が月で馬に乗っている写真。カタカナとひらがなのテキスト。東京の夜景、美しい桜の花。
달에서 말을 타는 우주 비행사의 사진. 한국어 텍스트입니다. 아름다운 꽃과 나무가 있는 정원.
Фотография астронавта, едущего на лошади по Луне. Красивый сад с цветами и деревьями.
Φωτογραφία ενός αστροναύτη που ιππεύει ένα άλογο στο φεγγάρι.
صورة لرائد فضاء يركب حصانا على سطح القمر. حديقة جميلة فيها زهور وأشجار.
Ảnh một phi hành gia cưỡi ngựa trên mặt trăng. Một khu vườn đẹp với hoa và cây.
चाँद पर घोड़े की सवारी करते अंतरिक्ष यात्री की तस्वीर।
ภาพถ่ายของนักบินอวกาศขี่ม้าบนดวงจันทร์
"""


def train_unigram_model(folder):
    """A small unigram model trained as XLM-R's was (nmt_nfkc, unk/bos/eos at 0/1/2), one thread, fixed seed.
    Trained inside `folder` with relative paths, since the model records its training paths."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        with open("corpus.txt", "w", encoding="utf-8") as f:
            for repeat in range(8):
                f.write(CORPUS)
        sentencepiece.set_random_generator_seed(1234)
        sentencepiece.SentencePieceTrainer.train(
            input="corpus.txt", model_prefix="spm", vocab_size=1000, model_type="unigram", character_coverage=1.0,
            hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", num_threads=1, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, minloglevel=2)
        with open("spm.model", "rb") as f:
            return f.read()
    finally:
        os.chdir(previous)


def xlmr_config():
    """tokenizer_config.json as transformers 4.x saved XLM-R's (<mask> strips left; transformers 5 ignores that)."""
    return {
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": True,
                       "rstrip": False, "single_word": False},
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }


def unigram_unicode_table(tokenizer):
    normalizer = tokenizer.backend_tokenizer.normalizer
    table = {}
    for scalar in range(0x110000):
        if 0xD800 <= scalar < 0xE000:
            continue
        c = chr(scalar)
        alone = normalizer.normalize_str(c)
        if alone != c:
            table[str(scalar)] = alone
    return table


# MARK: - Cases

def long_chinese():
    return ("一幅美丽的中国山水画，高山流水，云雾缭绕，远处有一座古老的寺庙，近处有一条小河，河边有几棵柳树，"
            "柳树下有一位老人在钓鱼，天空中有几只飞鸟，夕阳西下，金色的阳光洒在山上，画面宁静而优美，细节丰富，杰作")


PROMPTS = [
    "一只猫坐在月球上，旁边是一杯咖啡。真的吗？太好了！",
    "中文测试：「引号」『书名』【括号】《书》（全角）～・…——“引用”‘单引’",
    "2024年的iPhone 15 Pro价格是7999元，约合US$1,099.99（含税）",
    "一只可爱的猫🐱和狗🐶 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 ❤\ufe0f 🥰🫠🫨",
    "ＦＵＬＬ－ＷＩＤＴＨ\u3000ｔｅｘｔ\u3000１２３！？ ｶﾀｶﾅ ﾊﾝｶｸ",
    "café naïve Ångström résumé façade Kraków São Paulo",
    "cafe\u0301 A\u030angstro\u0308m e\u0301\u0302 o\u0308\u0304 z\u0335\u0336 Z\u0351\u0352\u0353a\u0300",
    "ΣΊΣΥΦΟΣ İstanbul straße GROẞE ǅemal ﬁne ℌ ℃ ㎏ ①②",
    "宇宙飛行士が月で馬に乗っている写真、カタカナとひらがな",
    "달에서 말을 타는 우주 비행사의 사진 ㄱㄴㄷ 가",
    "A photograph of an astronaut riding a horse, 4k, trending on ArtStation",
    "https://www.example.com/path/to/page.html?q=猫&lang=zh-CN#frag user.name+tag@example.org",
    "  lots   of\twhite\t\tspace\nand\r\nnewlines \u3000 ideographic\u00a0nbsp\u2028line sep\u2029para\u0085nel  ",
    "bell\x07 null\x00 esc\x1b del\x7f zero\u200bwidth zwj\u200d bom\ufeff sep\x1c\x1d unit\x1f repl\ufffd\x0b\x0c",
    "private\ue000\U000F0000 unassigned\u0378\U0001FAE8 surrogate-free",
    "CJK \U00020000\U0002A6DF \U0002A700 \U0002B740 \U0002B81F \U0002B820\U0002B91F \U0002B920 \U0002CEAF "
    "\uF900\uFA0E\uFAD9 \U0002F800 㐀䶵 〇 ㄅㄆ 々 〆",
    "!!!???... a--b (x) [y] {z} 'hello' \"quoted\" ---> <<>> $5 ^_^ `tick` ¿¡ ‰ § ¶ • ※",
    "a [MASK] b [CLS] [unk] [SEP][PAD] [mask]",
    "<s> a <mask> b </s> <pad> <unk> x<mask>y",
    "1234567 3.14 1,000 ٣٤٥ ½ ² ⅷ ⑩ ０９",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Привет, мир! Ёлка",
    "a▁b ▁▁c ▁",
    "x" * 100 + " " + "y" * 101 + " z",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "一幅美丽的山水画，高山流水，云雾缭绕，中国风",
    "   \t\n ",
    "",
    "!",
    "猫" * 50,
    "猫" * 51,
    long_chinese(),
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a photograph of " * 30,
]


def untruncated_cut(tokenizer, text, max_length):
    """What diffusers' encode_prompt warns was cut off: the ids past max_length - 1, before the last one."""
    padded = tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids
    untruncated = tokenizer(text, padding="longest").input_ids
    if len(untruncated) >= len(padded) and untruncated != padded:
        return tokenizer.batch_decode([untruncated[max_length - 1:-1]])[0]
    return None


def reference(tokenizer, text, max_length):
    ids = tokenizer(text).input_ids
    padded = tokenizer(text, padding="max_length", max_length=max_length, truncation=True)
    return {
        "ids": ids,
        "input_ids": padded.input_ids,
        "attention_mask": padded.attention_mask,
        "decoded": tokenizer.decode(ids),
        "decoded_skip": tokenizer.decode(ids, skip_special_tokens=True),
        "truncated_text": untruncated_cut(tokenizer, text, max_length),
    }


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_cases(path, header, cases):
    """The header indented, then one line per case and folder, so the file stays small and diffs stay readable."""
    compact = {"ensure_ascii": False, "separators": (",", ":")}
    lines = ["{"] + [f"  {json.dumps(key)}: {json.dumps(value, **compact)}," for key, value in header.items()]
    lines.append('  "cases": [')
    for index, case in enumerate(cases):
        lines.append("    {")
        items = list(case.items())
        for item_index, (key, value) in enumerate(items):
            comma = "," if item_index + 1 < len(items) else ""
            if isinstance(value, dict):
                lines.append(f"      {json.dumps(key)}: {{")
                results = list(value.items())
                for result_index, (name, result) in enumerate(results):
                    inner = "," if result_index + 1 < len(results) else ""
                    lines.append(f"        {json.dumps(name)}: {json.dumps(result, **compact)}{inner}")
                lines.append("      }" + comma)
            else:
                lines.append(f"      {json.dumps(key)}: {json.dumps(value, **compact)}{comma}")
        lines.append("    }" + ("," if index + 1 < len(cases) else ""))
    lines.append("  ]")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_compact_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def make_wordpiece(args, out):
    vocab_bytes, tokenizer_source = cn_clip_files(args.cn_clip_wheel)
    folder = os.path.join(out, "cn_clip")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    vocab_path = os.path.join(folder, "vocab.txt")
    with open(vocab_path, "wb") as f:
        f.write(vocab_bytes)
    vocab_ids = {line: index for index, line in enumerate(vocab_bytes.decode("utf-8").split("\n")) if line}
    write_json(os.path.join(folder, "tokenizer_config.json"), bert_config(vocab_ids))
    write_json(os.path.join(folder, "special_tokens_map.json"), {
        "cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"})

    variants_root = os.path.join(out, "wordpiece_config_variants")
    shutil.rmtree(variants_root, ignore_errors=True)
    tokenizers_by_name = {"cn_clip": BertTokenizer.from_pretrained(folder)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in WORDPIECE_VARIANTS.items():
            os.makedirs(os.path.join(variants_root, name))
            write_json(os.path.join(variants_root, name, "tokenizer_config.json"), bert_config(vocab_ids, **overrides))
            # The reference loads the variant as the test assembles it: the config beside cn_clip's vocab.txt.
            assembled = os.path.join(tmp, name)
            os.makedirs(assembled)
            shutil.copy(vocab_path, assembled)
            shutil.copy(os.path.join(variants_root, name, "tokenizer_config.json"), assembled)
            tokenizers_by_name[name] = BertTokenizer.from_pretrained(assembled)
        # A folder with vocab.txt alone takes BertTokenizer's defaults, which are cn_clip's configuration.
        bare = os.path.join(tmp, "vocab_only")
        os.makedirs(bare)
        shutil.copy(vocab_path, bare)
        vocab_only = BertTokenizer.from_pretrained(bare)
        for name, tokenizer in tokenizers_by_name.items():
            assert type(tokenizer).__name__ == "BertTokenizer" and tokenizer.is_fast, (name, type(tokenizer))

        full_tokenizer = load_cn_clip_tokenizer(tokenizer_source, vocab_path)
        cases, differences = [], []
        for text in PROMPTS:
            results = {name: reference(t, text, WORDPIECE_MAX_LENGTH) for name, t in tokenizers_by_name.items()}
            bare_result = reference(vocab_only, text, WORDPIECE_MAX_LENGTH)
            for key in ("ids", "input_ids", "attention_mask"):
                assert bare_result[key] == results["cn_clip"][key], ("vocab-only folder differs", text)
            case = {"text": text, "results": results}
            if full_tokenizer is not None:
                case["cn_clip"] = cn_clip_tokenize(full_tokenizer, text)
                if case["cn_clip"] != results["cn_clip"]["input_ids"]:
                    differences.append(text)
            cases.append(case)

    write_cases(os.path.join(out, "wordpiece_cases.json"), {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer": "transformers.BertTokenizer (is_fast: True)",
        "cn_clip": CN_CLIP_WHEEL,
        "max_length": WORDPIECE_MAX_LENGTH,
        "vocab_size": len(vocab_ids),
        "pad_token_id": tokenizers_by_name["cn_clip"].pad_token_id,
    }, cases)
    table = wordpiece_unicode_table(tokenizers_by_name)
    write_compact_json(os.path.join(out, "wordpiece_unicode.json"), {"tokenizers": tokenizers.__version__, **table})
    print(f"wrote wordpiece fixtures: {len(cases)} cases; cn_clip's own tokenizer differs on {len(differences)}:")
    for text in differences:
        print("   ", repr(text[:70]))


def make_unigram(args, out):
    folder = os.path.join(out, "xlmr_small")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with tempfile.TemporaryDirectory() as tmp:
        model = train_unigram_model(tmp)
        model_only = os.path.join(tmp, "model_only")
        os.makedirs(model_only)
        with open(os.path.join(model_only, "sentencepiece.bpe.model"), "wb") as f:
            f.write(model)
        # tokenizer.json as transformers converts the SentencePiece model (the hub's is such a conversion).
        converted = XLMRobertaTokenizer.from_pretrained(model_only)
        saved = os.path.join(tmp, "saved")
        converted.save_pretrained(saved)
        with open(os.path.join(folder, "sentencepiece.bpe.model"), "wb") as f:
            f.write(model)
        shutil.copy(os.path.join(saved, "tokenizer.json"), folder)
        write_json(os.path.join(folder, "tokenizer_config.json"), xlmr_config())

        json_only = os.path.join(tmp, "json_only")
        os.makedirs(json_only)
        shutil.copy(os.path.join(folder, "tokenizer.json"), json_only)
        tokenizer = XLMRobertaTokenizer.from_pretrained(folder)
        others = {"tokenizer.json": XLMRobertaTokenizer.from_pretrained(json_only),
                  "sentencepiece.bpe.model": XLMRobertaTokenizer.from_pretrained(model_only)}
        assert type(tokenizer).__name__ == "XLMRobertaTokenizer" and tokenizer.is_fast
        cases = []
        for text in PROMPTS:
            result = reference(tokenizer, text, UNIGRAM_MAX_LENGTH)
            for name, other in others.items():
                other_result = reference(other, text, UNIGRAM_MAX_LENGTH)
                for key in ("ids", "input_ids", "attention_mask"):
                    assert other_result[key] == result[key], (name, text)
            cases.append({"text": text, "results": {"xlmr_small": result}})
        table = unigram_unicode_table(tokenizer)

    write_cases(os.path.join(out, "unigram_cases.json"), {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "tokenizer": "transformers.XLMRobertaTokenizer (is_fast: True)",
        "max_length": UNIGRAM_MAX_LENGTH,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "special_token_ids": {name: getattr(tokenizer, name + "_id") for name in
                              ["bos_token", "eos_token", "pad_token", "unk_token", "mask_token"]},
    }, cases)
    write_compact_json(os.path.join(out, "unigram_unicode.json"),
                       {"tokenizers": tokenizers.__version__, "normalized": table})
    print(f"wrote unigram fixtures: {len(tokenizer)} tokens, {len(cases)} cases, {len(table)} normalized scalars")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/tokenizers")
    parser.add_argument("--cn-clip-wheel", help="cn_clip-1.6.0-py3-none-any.whl (default: downloaded from PyPI)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    make_wordpiece(args, args.out)
    make_unigram(args, args.out)


if __name__ == "__main__":
    main()
