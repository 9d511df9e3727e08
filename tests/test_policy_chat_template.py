"""The embedded tokenizer's chat template: one user message renders as the plain prompt (BOS + text)."""

from __future__ import annotations

from fixtures import prompt_text


def test_one_user_message_renders_as_the_plain_prompt(tiny_policy):
    from tcrlsd.critique.backends import render_chat
    from tcrlsd.policy import CHAT_TEMPLATE, encode_prompt, load_tokenizer

    tok = load_tokenizer(tiny_policy)
    assert tok.chat_template == CHAT_TEMPLATE  # saved with the checkpoint, loaded back
    text = prompt_text("Start with 7. Add 3.")
    rendered = render_chat(tok, text)
    assert rendered == tok.bos_token + text
    ids = encode_prompt(tok, rendered)
    assert ids == encode_prompt(tok, text) and ids.count(tok.bos_token_id) == 1
    # More turns: non-assistant messages apart by a blank line; an assistant turn ends with EOS.
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == "<s>S\n\nUA</s>V"
