"""Writes the toy world's Chinese text tower: a randomly initialised, frozen ChineseCLIPTextModel with the real
Chinese-CLIP vocabulary (cn_clip's vocab.txt, 21128 WordPiece tokens), in transformers format.

    tools/reference/.venv/bin/python tools/toyworld/make_zh_encoder.py --out models/toyworld-zh/text_encoder

The weights are never trained: the PEA adapter does the work (as with a real Chinese-CLIP, whose states the
English UNet has never seen). Width 64, 2 layers, 4 heads, 64 positions (cn_clip uses 52 tokens); saved in
float16. The padding row of the word embeddings is zeroed here, so that transformers (which zeroes it when it
loads a BERT-style checkpoint) and the file agree.

How the random weights are drawn matters, because the English teacher reads colour from CLIP's padding positions:
given the word states of "a green square" and the padding states of "a purple square" it draws a purple square
(in 6 of 8 such swaps the colour follows the padding; in the other 2 it leaves the words' colour). A trained
tower's padding states carry the sentence; a random one's must too, or the adapter, which maps each position on
its own, has no colour to put there.
- BERT's usual 0.02 everywhere: attention adds ~3% to the residual stream; the padding states do not vary with the
  caption at all (variance across the six colours of "一个{颜色}的圆形" 0.0000, across positions 0.54). Adapters
  learn the shape, not the colour.
- 0.2 everywhere (the first bundled tower): the padding states vary with the caption (colour 0.013, shape 0.087),
  but through two layers of sharp random attention, so the caption's parts mix non-additively (the state of red
  cross differs from red circle + blue cross − blue circle by 0.044): adapters had to learn each combination on
  its own, colour stayed at 50% and the held-out combinations at 17%.
- This tower: 0.02, except the attention's query and key weights (0.02: nearly uniform attention over the
  caption's tokens) and its value and output weights (0.2: a large share of that average in every state). Each
  padding state is then about position + the average of the caption's tokens (colour 0.013, shape 0.034,
  position 0.050, non-additive part 0.0004), and a token's own state keeps its identity. In a 1,000-step
  `pea train` trial against the same (3,500-step) teacher and with the same flags (--task-weight 0
  --timestep-bias-strategy later --timestep-bias-multiplier 4), 9 of 20 Chinese samples had the right colour
  against 6 with the 0.2 tower, and 2 of the 4 held-out combinations came out right against none.
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
    parser.add_argument("--init-range", type=float, default=0.02, help="std of the random weights (BERT's default)")
    parser.add_argument("--query-key-std", type=float, default=0.02, help="std of the attention's query and key weights")
    parser.add_argument("--value-output-std", type=float, default=0.2,
                        help="std of the attention's value and output weights")
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
        for layer in model.encoder.layer:
            for linear in (layer.attention.self.query, layer.attention.self.key):
                linear.weight.normal_(0, args.query_key_std)
            for linear in (layer.attention.self.value, layer.attention.output.dense):
                linear.weight.normal_(0, args.value_output_std)
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tokenizer = BertTokenizer.from_pretrained(args.out)
    print(f"wrote {args.out}: vocab {vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"'一个红色的圆形' → {tokenizer.tokenize('一个红色的圆形')}")


if __name__ == "__main__":
    main()
