#!/usr/bin/env python3
"""PEA's language-specific text encoders, the PEA adapter and torch.save checkpoints, as tiny reference fixtures.

Writes, under --out (default Tests/Fixtures/multilingual):

  Text encoders (transformers, random perturbed weights, saved by save_pretrained as real model folders):
    chinese_clip_text/  ChineseCLIPTextModel (Chinese-CLIP's text tower: BERT, post-LN, gelu, eps 1e-12)
    chinese_clip_full/  ChineseCLIPModel (config with text_config and vision_config; weights under
                        `text_model.` beside a tiny vision tower), another text shape and eps
    bert_prefixed/      BertForMaskedLM (weights under `bert.`, plus the `cls.` head nothing should use)
    bert_bin/           the same weights as torch.save(state_dict) → pytorch_model.bin (no io: bert_prefixed's)
    cn_clip_pt/         chinese_clip_text's weights in cn_clip's own layout: a model config with `text_*` keys and
                        a training checkpoint .pt whose "state_dict" holds `module.bert.*` beside other towers
                        (no io: chinese_clip_text's)
    xlm_roberta/        XLMRobertaModel (multilingual CLIP's text tower: padding-aware position ids,
                        pad_token_id 1, one token type)
  each with io.safetensors: `input_ids` [B, L] int64, `attention_mask` [B, L] int64 (ids != pad, as cn_clip and
  open_clip build it) and `out.last_hidden_state` [B, L, D]. Rows are padded, so the padding rows of the
  word (and, for XLM-R, position) embeddings reach the outputs. transformers 5 zeroes those rows in
  `from_pretrained`; the reference reloads the saved file's state dict explicitly afterwards, so the outputs use
  the file's values, as cn_clip and open_clip do (the script checks that this changes the outputs).

  PEA adapters (a plain nn.Module written from the method's description: layernorm → bias-free Linear/GELU
  stack; SDXL form: sequence = fc(gelu(stack)), pooled = mean of the stack output over all tokens):
    adapter_sd1/        3 linears 32→48→48→24
    adapter_sd1_deep/   5 linears 32→40→40→40→40→24 (the depth of the released SD1.5 inference script)
    adapter_sdxl/       3 linears 32→40→40→20, fc 20→36 with bias
  each with `pytorch_model.bin` (torch.save(state_dict), the zip format of the official checkpoints),
  `adapter.safetensors` (the same tensors) and io.safetensors: `states` [B, L, in] and `out.sequence`,
  `out.pooled` (SDXL). adapter_sdxl also has `pytorch_model_fp16.bin` (the state dict in float16, as the
  official SDXL checkpoints are saved) with `out.fp16.sequence`, `out.fp16.pooled` computed from those values.

  pea_conditioning.safetensors: chinese_clip_text's `input_ids`/`attention_mask` through its encoder and then
    adapter_sd1 (`out.sd1.sequence`) and adapter_sdxl (`out.sdxl.sequence`, `out.sdxl.pooled`), end to end.

  torch/ — torch.save files for the native reader:
    roundtrip.pt (+ roundtrip_expected.safetensors with every tensor made contiguous): f32, f16, bf16, i64,
      i32, a transposed view and a slice sharing the f32 tensor's storage, an expanded (stride 0) tensor, a
      0-d tensor, an empty tensor, an nn.Parameter
    roundtrip_p4.pt: the same dict saved with pickle protocol 4 (FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE)
    zip64.pt: roundtrip.pt's records re-zipped by CPython's zipfile with zip64 fields and end records (the classic
      end record's directory offset saturated, as in a > 4 GiB file)
    wrapped.pt: {"epoch", "name", "state_dict": {...}} as training checkpoints (cn_clip's) are saved
    rejected (each must fail with a clear error, without running anything):
      list.pt (a list of tensors), tensor.pt (a bare tensor), non_tensor_value.pt (an int beside a tensor),
      double.pt (a float64 tensor), legacy.pt (_use_new_zipfile_serialization=False),
      compressed.bin (the SD1 adapter's entries re-zipped with deflate), truncated.bin (its first half),
      evil_os_system.bin (GLOBAL os.system + REDUCE), evil_stack_global.bin (protocol 4 STACK_GLOBAL
      builtins.eval), evil_inst.bin (INST os.system), evil_torch_global.bin (GLOBAL torch.load, not on the
      allow-list), evil_build.bin (BUILD on a rebuilt tensor), bare_pickle.pkl (a pickle outside a zip).
    The malicious pickles are written byte by byte (and disassembled with pickletools to check them);
    nothing here ever unpickles them.

Weights are float32; reference outputs are computed in float64 from the saved values and stored as float32.
io metadata: one key, `fixture`, holding sorted JSON. A rerun rewrites the same bytes except torch/legacy.pt
(the legacy format names storages by their memory addresses).
"""
import argparse
import collections
import io
import json
import os
import pickletools
import shutil
import struct
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (BertConfig, BertForMaskedLM, ChineseCLIPConfig, ChineseCLIPModel, ChineseCLIPTextConfig,
                          ChineseCLIPTextModel, XLMRobertaConfig, XLMRobertaModel)


def perturb(model, generator):
    # Move every parameter off its initial value (layer norms start at 1/0, padding rows at 0).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def save_io(path, tensors, metadata):
    # One metadata key (sorted JSON): safetensors writes several keys in hash order, and a rerun should give the
    # same bytes.
    tensors = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"fixture": json.dumps(metadata, sort_keys=True)})


def zip_entry(name, compress):
    """A zip entry with a fixed timestamp, so a rerun gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compress
    return info


def reload_with_file_values(cls, folder):
    """from_pretrained, then the file's own tensors (transformers 5 zeroes padding_idx rows while loading)."""
    model = cls.from_pretrained(folder)
    file_values = load_file(os.path.join(folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(file_values, strict=False)
    assert not unexpected, unexpected
    return model.to(torch.float64).eval()


def text_case(out, name, cls, config, ids, pad_id, run, generator, trap=True):
    torch.manual_seed(0)
    model = cls(config).eval()
    perturb(model, generator)
    folder = os.path.join(out, name)
    model.save_pretrained(folder, safe_serialization=True)
    mask = ids.ne(pad_id).to(torch.int64)
    reference = reload_with_file_values(cls, folder)
    zeroed = cls.from_pretrained(folder).to(torch.float64).eval()
    with torch.no_grad():
        hidden = run(reference, ids, mask)
        hidden_zeroed = run(zeroed, ids, mask)
    # The fixture only guards the trap if transformers' zeroing would change the outputs. (It does not zero the
    # rows of the models whose config ties word embeddings, BertForMaskedLM and XLMRobertaModel: `trap=False`.)
    change = float((hidden - hidden_zeroed).abs().max())
    print(f"{name}: transformers' zeroed padding rows would change the output by {change:.3g}")
    assert change > 1e-3 or not trap
    save_io(os.path.join(folder, "io.safetensors"),
            {"input_ids": ids, "attention_mask": mask, "out.last_hidden_state": hidden},
            {"kind": "text_encoder", "class": cls.__name__, "transformers": __import__("transformers").__version__})


def make_text_encoders(out, generator):
    # BERT-style rows: [CLS]=101 … [SEP]=102, then [PAD]=0 up to the length (cn_clip pads with 0).
    bert_ids = torch.tensor([[101, 5, 17, 88, 23, 102, 0, 0, 0, 0, 0, 0],
                             [101, 42, 7, 7, 99, 120, 3, 64, 11, 9, 2, 102],
                             [101, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int64)
    last_hidden = lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state

    text = ChineseCLIPTextConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=16, type_vocab_size=2,
                                 layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    text_case(out, "chinese_clip_text", ChineseCLIPTextModel, text, bert_ids, 0, last_hidden, generator)

    full = ChineseCLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                         intermediate_size=40, max_position_embeddings=14, type_vocab_size=2, layer_norm_eps=1e-5,
                         hidden_act="gelu", pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=8)
    text_case(out, "chinese_clip_full", ChineseCLIPModel, full, bert_ids, 0,
              lambda m, ids, mask: m.text_model(input_ids=ids, attention_mask=mask).last_hidden_state, generator)

    mlm = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=12, type_vocab_size=2, layer_norm_eps=1e-12,
                     hidden_act="gelu", pad_token_id=0)
    text_case(out, "bert_prefixed", BertForMaskedLM, mlm, bert_ids, 0,
              lambda m, ids, mask: m.bert(input_ids=ids, attention_mask=mask).last_hidden_state, generator,
              trap=False)
    # The same model as torch.save(state_dict) → pytorch_model.bin (the older transformers layout); same outputs.
    binary = os.path.join(out, "bert_bin")
    os.makedirs(binary)
    shutil.copy(os.path.join(out, "bert_prefixed", "config.json"), binary)
    torch.save(collections.OrderedDict(sorted(load_file(os.path.join(out, "bert_prefixed", "model.safetensors")).items())),
               os.path.join(binary, "pytorch_model.bin"))

    # XLM-R rows: <s>=0 … </s>=2, then <pad>=1, as open_clip's HF tokenizer pads to the context length.
    xlmr_ids = torch.tensor([[0, 5, 17, 88, 23, 2, 1, 1, 1, 1, 1, 1],
                             [0, 42, 7, 7, 99, 120, 3, 64, 11, 9, 4, 2],
                             [0, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    xlmr = XLMRobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=16, type_vocab_size=1,
                            layer_norm_eps=1e-5, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2)
    text_case(out, "xlm_roberta", XLMRobertaModel, xlmr, xlmr_ids, 1, last_hidden, generator, trap=False)


class ReferenceAdapter(nn.Module):
    """PEA's adapter as PEA-METHOD.md describes it (written here, not taken from the authors' scripts)."""

    def __init__(self, widths, fc_out=None):
        super().__init__()
        self.layernorm = nn.LayerNorm(widths[0])
        layers = []
        for i in range(len(widths) - 1):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        self.projector = nn.Sequential(*layers)
        if fc_out is not None:
            self.fc = nn.Linear(widths[-1], fc_out)
        else:
            self.fc = None

    def forward(self, x):
        x = self.projector(self.layernorm(x))
        if self.fc is None:
            return x, None
        return self.fc(F.gelu(x)), x.mean(dim=1)


def adapter_outputs(state, widths, fc_out, states, prefix):
    model = ReferenceAdapter(widths, fc_out).to(torch.float64)
    model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
    with torch.no_grad():
        sequence, pooled = model(states.to(torch.float64))
    result = {f"{prefix}.sequence": sequence}
    if pooled is not None:
        result[f"{prefix}.pooled"] = pooled
    return result


def adapter_case(out, name, widths, fc_out, generator):
    torch.manual_seed(0)
    model = ReferenceAdapter(widths, fc_out).eval()
    perturb(model, generator)
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict()
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "adapter.safetensors"))
    states = torch.randn(2, 7, widths[0], generator=generator)
    tensors = {"states": states}
    tensors.update(adapter_outputs(torch.load(os.path.join(folder, "pytorch_model.bin")), widths, fc_out, states, "out"))
    if fc_out is not None:
        half = collections.OrderedDict((k, v.half()) for k, v in state.items())
        torch.save(half, os.path.join(folder, "pytorch_model_fp16.bin"))
        tensors.update(adapter_outputs(half, widths, fc_out, states, "out.fp16"))
    save_io(os.path.join(folder, "io.safetensors"), tensors,
            {"kind": "pea_adapter", "widths": ",".join(map(str, widths)), "fc": str(fc_out or "")})


# --- torch.save files ------------------------------------------------------------------------------------

def roundtrip_dict(generator):
    base = torch.randn(3, 4, generator=generator)
    column = torch.randn(3, 1, generator=generator)
    return collections.OrderedDict([
        ("f32", base),
        ("transposed", base.t()),                      # strides (1, 4), same storage
        ("sliced", base[1:, 1:3]),                     # offset 5, strides (4, 1), same storage
        ("expanded", column.expand(3, 4)),             # strides (1, 0)
        ("f16", torch.randn(5, generator=generator).half()),
        ("bf16", torch.randn(2, 3, generator=generator).bfloat16()),
        ("i64", torch.arange(6, dtype=torch.int64).reshape(2, 3) - 2),
        ("i32", torch.tensor([-1, 2 ** 31 - 1, -2 ** 31], dtype=torch.int32)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 3)),
        ("param", nn.Parameter(torch.randn(2, 2, generator=generator))),
    ])


def zip_like_torch(path, records, compress=zipfile.ZIP_STORED, archive="archive"):
    """A zip laid out like torch.save's: <archive>/data.pkl, <archive>/data/<key>, version, byteorder."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zip_entry(f"{archive}/data.pkl", compress), records.pop("data.pkl"))
        for name, data in records.items():
            z.writestr(zip_entry(f"{archive}/{name}", compress), data)
        z.writestr(zip_entry(f"{archive}/byteorder", compress), b"little")
        z.writestr(zip_entry(f"{archive}/version", compress), b"3\n")


def unicode(text):  # BINUNICODE
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def evil_pickles():
    """Hand-assembled pickles that a general unpickler would execute code from. Never loaded here."""
    command = unicode("echo this-must-never-run")
    return {
        # GLOBAL os.system, called by REDUCE with one argument.
        "evil_os_system.bin": b"\x80\x02" + b"cos\nsystem\n" + b"q\x00" + command + b"\x85" + b"R" + b".",
        # Protocol 4: STACK_GLOBAL builtins.eval.
        "evil_stack_global.bin": (b"\x80\x04" + b"\x8c\x08builtins" + b"\x8c\x04eval" + b"\x93" + b"\x94"
                                  + unicode("print('pwned')") + b"\x85" + b"R" + b"."),
        # INST: MARK, args, then the class to instantiate.
        "evil_inst.bin": b"\x80\x02" + b"(" + command + b"ios\nsystem\n" + b".",
        # A torch function that is not on the allow-list (the list is exact names, not a "torch." prefix).
        "evil_torch_global.bin": b"\x80\x02" + b"ctorch\nload\n" + unicode("/etc/passwd") + b"\x85" + b"R" + b".",
    }


def evil_build():
    """A real tensor rebuilt by _rebuild_tensor_v2, then BUILD with a state: __setstate__ on a tensor."""
    storage = (b"(" + unicode("storage") + b"ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu")
               + b"K\x01" + b"t" + b"Q")
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n" + b"(" + storage + b"K\x00" + b"K\x01\x85" + b"K\x01\x85"
              + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"t" + b"R")
    pickle = b"\x80\x02" + tensor + b"}" + unicode("x") + b"K\x01" + b"s" + b"b" + b"."
    return {"data.pkl": pickle, "data/0": struct.pack("<f", 1.0)}


def make_cn_clip_checkpoint(out):
    """chinese_clip_text's weights in cn_clip's own layout: its model config (text_* keys) and a training
    checkpoint {"epoch", "step", "name", "state_dict": {"module.bert.…", "module.visual.…", "module.logit_scale"}}.
    Same weights, so chinese_clip_text's io applies."""
    folder = os.path.join(out, "cn_clip_pt")
    os.makedirs(folder)
    with open(os.path.join(out, "chinese_clip_text", "config.json")) as f:
        config = json.load(f)
    cn_config = {"vocab_size": config["vocab_size"]}
    for name in ["attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size", "initializer_range",
                 "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
                 "type_vocab_size"]:
        cn_config["text_" + name] = config[name]
    with open(os.path.join(folder, "RoBERTa-wwm-ext-tiny-chinese.json"), "w") as f:
        json.dump(cn_config, f, indent=4)
    weights = load_file(os.path.join(out, "chinese_clip_text", "model.safetensors"))
    state = collections.OrderedDict(("module.bert." + k, v) for k, v in sorted(weights.items()))
    state["module.visual.proj"] = torch.full((4, 8), 0.25)
    state["module.logit_scale"] = torch.tensor(4.6052)
    torch.save({"epoch": 3, "step": 1000, "name": "tiny", "state_dict": state}, os.path.join(folder, "clip_cn_tiny.pt"))


def make_pea_conditioning(out):
    """Chinese-CLIP text tower → each adapter, end to end, for the conditioner (input_ids as in its io)."""
    folder = os.path.join(out, "chinese_clip_text")
    encoder = reload_with_file_values(ChineseCLIPTextModel, folder)
    io_values = load_file(os.path.join(folder, "io.safetensors"))
    ids, mask = io_values["input_ids"], io_values["attention_mask"]
    with torch.no_grad():
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    tensors = {"input_ids": ids, "attention_mask": mask}
    for name, widths, fc_out in [("sd1", [32, 48, 48, 24], None), ("sdxl", [32, 40, 40, 20], 36)]:
        state = torch.load(os.path.join(out, f"adapter_{name}", "pytorch_model.bin"))
        tensors.update(adapter_outputs(state, widths, fc_out, states, f"out.{name}"))
    save_io(os.path.join(out, "pea_conditioning.safetensors"), tensors,
            {"kind": "pea_conditioning", "encoder": "chinese_clip_text", "adapters": "adapter_sd1,adapter_sdxl"})


def make_torch_files(out, generator, adapter_bin):
    folder = os.path.join(out, "torch")
    os.makedirs(folder, exist_ok=True)
    state = roundtrip_dict(generator)
    torch.save(state, os.path.join(folder, "roundtrip.pt"))
    torch.save(state, os.path.join(folder, "roundtrip_p4.pt"), pickle_protocol=4)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
              os.path.join(folder, "roundtrip_expected.safetensors"))
    small = collections.OrderedDict([("a.weight", state["f32"].clone()), ("a.bias", torch.arange(3.0))])
    torch.save({"epoch": 3, "name": "wrapped", "lr": 1e-5, "state_dict": small}, os.path.join(folder, "wrapped.pt"))

    torch.save([state["f32"], state["f16"]], os.path.join(folder, "list.pt"))
    torch.save(state["f32"], os.path.join(folder, "tensor.pt"))
    torch.save({"a": state["f32"], "epoch": 3}, os.path.join(folder, "non_tensor_value.pt"))
    torch.save({"a": torch.randn(2, dtype=torch.float64, generator=generator)}, os.path.join(folder, "double.pt"))
    torch.save(small, os.path.join(folder, "legacy.pt"), _use_new_zipfile_serialization=False)

    with zipfile.ZipFile(adapter_bin) as source, \
            zipfile.ZipFile(os.path.join(folder, "compressed.bin"), "w") as target:
        for info in source.infolist():
            target.writestr(zip_entry(info.filename, zipfile.ZIP_DEFLATED), source.read(info.filename))
    with open(adapter_bin, "rb") as f:
        data = f.read()
    with open(os.path.join(folder, "truncated.bin"), "wb") as f:
        f.write(data[:len(data) // 2])

    # The same records in a zip64 archive (CPython's zipfile writes zip64 extra fields and the zip64 end records
    # for anything past ZIP64_LIMIT; lowering the limit makes a small file use them, as a > 4 GiB checkpoint would).
    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 64
    try:
        with zipfile.ZipFile(os.path.join(folder, "roundtrip.pt")) as source, \
                zipfile.ZipFile(os.path.join(folder, "zip64.pt"), "w") as target:
            for info in source.infolist():
                target.writestr(zip_entry(info.filename.replace("roundtrip/", "zip64/"), zipfile.ZIP_STORED),
                                source.read(info.filename))
    finally:
        zipfile.ZIP64_LIMIT = limit
    # Past 4 GiB the classic end record's directory offset saturates at 0xFFFFFFFF and readers must follow the
    # zip64 records; saturate it here too (CPython's reader, below, still reads the archive).
    with open(os.path.join(folder, "zip64.pt"), "r+b") as f:
        data = f.read()
        assert b"PK\x06\x06" in data  # the zip64 end-of-central-directory record
        end = data.rindex(b"PK\x05\x06")
        f.seek(end + 16)
        f.write(struct.pack("<I", 0xFFFFFFFF))
    with zipfile.ZipFile(os.path.join(folder, "zip64.pt")) as check:
        assert check.testzip() is None and len(check.namelist()) == len(zipfile.ZipFile(os.path.join(folder, "roundtrip.pt")).namelist())

    for name, pickle in evil_pickles().items():
        pickletools.dis(pickle, out=io.StringIO())  # a well-formed pickle (disassembly runs nothing)
        zip_like_torch(os.path.join(folder, name), {"data.pkl": pickle})
    build = evil_build()
    pickletools.dis(build["data.pkl"], out=io.StringIO())
    zip_like_torch(os.path.join(folder, "evil_build.bin"), build)
    with open(os.path.join(folder, "bare_pickle.pkl"), "wb") as f:
        f.write(evil_pickles()["evil_os_system.bin"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="Tests/Fixtures/multilingual")
    args = parser.parse_args()
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    generator = torch.Generator().manual_seed(20240611)
    make_text_encoders(args.out, generator)
    adapter_case(args.out, "adapter_sd1", [32, 48, 48, 24], None, generator)
    adapter_case(args.out, "adapter_sd1_deep", [32, 40, 40, 40, 40, 24], None, generator)
    adapter_case(args.out, "adapter_sdxl", [32, 40, 40, 20], 36, generator)
    make_cn_clip_checkpoint(args.out)
    make_pea_conditioning(args.out)
    make_torch_files(args.out, generator, os.path.join(args.out, "adapter_sd1", "pytorch_model.bin"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
