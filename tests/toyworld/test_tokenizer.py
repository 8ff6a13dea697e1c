import torch
from transformers import CLIPTextConfig, CLIPTextModel

from dmm.toyworld.content import all_captions, vocabulary
from dmm.toyworld.tokenizer import build_tokenizer, check_tokenizer, load_tokenizer


def test_every_word_one_token_and_eos_pooled(tmp_path):
    words = vocabulary()
    tok = build_tokenizer(tmp_path / "tok", words)
    check_tokenizer(tok, words)
    tok = load_tokenizer(tmp_path / "tok")  # what pipelines do: from_pretrained(folder)
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == w + "</w>"
    caption = all_captions()[42]
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, tok.model_max_length)
    assert tok.decode(ids[0], skip_special_tokens=True) == caption
    eos_pos = len(caption.split()) + 1
    assert ids[0, eos_pos].item() == tok.eos_token_id == len(tok) - 1
    # HF CLIP pools the EOS position: check both pooling rules land on it
    for eos_id in (tok.eos_token_id, 2):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                             eos_token_id=eos_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        model = CLIPTextModel(cfg).eval()
        with torch.no_grad():
            out = model(ids)
        assert torch.allclose(out.pooler_output[0], out.last_hidden_state[0, eos_pos])
