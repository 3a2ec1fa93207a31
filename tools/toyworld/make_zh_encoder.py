"""Writes the toy world's Chinese text tower: a randomly initialised, frozen ChineseCLIPTextModel with the real
Chinese-CLIP vocabulary (cn_clip's vocab.txt, 21128 WordPiece tokens), in transformers format.

    tools/reference/.venv/bin/python tools/toyworld/make_zh_encoder.py --out models/toyworld-zh/text_encoder

The weights are never trained: the PEA adapter does the work (as with a real Chinese-CLIP, whose states the
English UNet has never seen). Width 64, 2 layers, 4 heads, 64 positions (cn_clip uses 52 tokens); saved in
float16. The padding row of the word embeddings is zeroed here, so that transformers (which zeroes it when it
loads a BERT-style checkpoint) and the file agree.

The weights are drawn with initializer_range 0.2, not BERT's 0.02. With 0.02 the tower is nearly a bag of token
embeddings: attention adds ~3% to the residual stream, so the padding positions carry no trace of the sentence
(their variance across the six colours of "一个{颜色}的圆形" is 0.0000 against 0.55 across positions), where a
trained encoder's states are contextual. The English teacher reads its prompt largely from CLIP's end-of-text
and padding positions, which see the whole caption; the adapter maps each token on its own, so with such a
tower it can rebuild the shape (several characters, a length) but barely the colour. With 0.2 the padding
states vary with the caption (across colours 0.021, across shapes 0.092, across positions 0.050), as a trained
tower's do.
"""

import argparse
import os
import shutil

import torch
from transformers import BertTokenizer, ChineseCLIPTextConfig, ChineseCLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
CN_CLIP = os.path.join(HERE, "..", "..", "Tests", "Fixtures", "tokenizers", "cn_clip")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/toyworld-zh/text_encoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-range", type=float, default=0.2, help="std of the random weights (BERT's default: 0.02)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(CN_CLIP, name), os.path.join(args.out, name))
    with open(os.path.join(args.out, "vocab.txt"), encoding="utf-8") as f:
        vocab_size = sum(1 for _ in f)
    config = ChineseCLIPTextConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=64, type_vocab_size=2,
                                   layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
                                   initializer_range=args.init_range)
    torch.manual_seed(args.seed)
    model = ChineseCLIPTextModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[config.pad_token_id].zero_()
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer = BertTokenizer.from_pretrained(args.out)
    print(f"wrote {args.out}: vocab {vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"'一个红色的圆形' → {tokenizer.tokenize('一个红色的圆形')}")


if __name__ == "__main__":
    main()
