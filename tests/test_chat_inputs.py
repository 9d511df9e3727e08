"""Chat-template prompts through prepare -> generate -> critique -> score: what the model is fed.

A ``{{ bos_token }}`` chat template renders the BOS into the text; the student input (generate) and
the teacher input (critique's teacher_prompt, encoded by score) must each hold it exactly once, and
end with the same instruction + generation-prompt ids. Templates that print today's date render a
fixed one, so prompts do not change from day to day.
"""

from __future__ import annotations

import datetime

import pytest

from fixtures import INSTRUCTION
from tcrlsd.policy import encode_prompt, load_tokenizer

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>\n{{ m.content }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Llama-3.x style: date_string when the caller gives one, else strftime_now (today), as the real ones do.
DATE_TEMPLATE = ("{{ bos_token }}{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}"
                 "{% endif %}Today Date: {{ date_string }}|{{ strftime_now('%Y-%m-%d') }}\n"
                 "{% for m in messages %}<|user|>{{ m.content }}<|end|>{% endfor %}<|assistant|>")


@pytest.fixture
def chat_tokenizer(tiny_policy, tmp_path):
    tok = load_tokenizer(tiny_policy)
    tok.chat_template = BOS_TEMPLATE
    tok.save_pretrained(tmp_path / "chat-tok")
    return tmp_path / "chat-tok"


def _incorrect_row(problem: str, prompt: str) -> dict:
    return {"rollout_id": "p0#0", "prompt_id": "p0", "response_text": "\nStep 1: 4 + 2 = 7\n\\boxed{7}",
            "is_correct": False, "reason": "incorrect", "extracted_answer": "7", "problem": problem,
            "prompt": prompt, "answer": "6", "solution": "Step 1: 4 + 2 = 6\nThe final answer is \\boxed{6}."}


def test_bos_once_and_same_trailing_instruction_ids_for_student_and_teacher(chat_tokenizer):
    from tcrlsd.critique import CritiqueParams, critique_rows, make_critic
    from tcrlsd.critique.stage import chat_wrap_from, templates_for
    from tcrlsd.prepare.stage import render_prompt
    from tcrlsd.score.inputs import encode_teacher_context

    tok = load_tokenizer(chat_tokenizer)
    bos = tok.bos_token_id
    problem = "Start with 4. Add 2. What is the result?"
    # prepare renders the policy input through the chat template; generate encodes it
    prompt = render_prompt(problem, "{problem}" + INSTRUCTION, tok)
    assert prompt.startswith(tok.bos_token)
    student = encode_prompt(tok, prompt)
    # critique renders the teacher context from that prompt; score encodes it
    params = CritiqueParams(policy_chat_template_tokenizer=str(chat_tokenizer))
    table = critique_rows([_incorrect_row(problem, prompt)], params, make_critic("reference", params, ""),
                          templates_for(params), chat_wrap_from(params))
    teacher_prompt = table.column("teacher_prompt")[0].as_py()
    teacher = encode_teacher_context(tok, teacher_prompt)
    for ids in (student, teacher):
        assert ids.count(bos) == 1 and ids[0] == bos
    # naive encoding of the rendered text would double the BOS: the check above has teeth
    assert tok(prompt)["input_ids"].count(bos) == 2
    tail = tok(INSTRUCTION + "<|end|>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert student[-len(tail):] == teacher[-len(tail):] == tail
    assert len(teacher) > len(student) + 10  # the feedback sits before the shared tail


def test_chat_templates_that_print_the_date_get_a_fixed_one(tiny_policy):
    from tcrlsd.critique import render_chat
    from tcrlsd.prepare.stage import render_prompt
    from tcrlsd.templates import FIXED_CHAT_DATE, chat_wrap

    tok = load_tokenizer(tiny_policy)
    tok.chat_template = DATE_TEMPLATE
    fixed = f"Today Date: {FIXED_CHAT_DATE:%d %b %Y}|{FIXED_CHAT_DATE:%Y-%m-%d}"
    today = datetime.date.today()
    assert FIXED_CHAT_DATE.date() != today
    rendered = {
        "prepare": render_prompt("What is 1 + 1?", "{problem}", tok),
        "teacher wrap": "".join(chat_wrap(tok)),
        "critic": render_chat(tok, "Critique this."),
    }
    for where, text in rendered.items():
        assert fixed in text, where
        assert f"{today:%Y-%m-%d}" not in text, where
    # a caller's own date_string still wins over the fixed one
    assert "Today Date: 01 Jan 2030|" in render_chat(tok, "x", {"date_string": "01 Jan 2030"})


def test_teacher_context_whose_problem_is_not_in_the_prompt_is_an_error():
    from tcrlsd.critique import CritiqueError, CritiqueParams, critique_rows, make_critic
    from tcrlsd.critique.stage import templates_for

    params = CritiqueParams()
    row = _incorrect_row("Start with 4. Add 2. What is the result?", "Start with 4.  Add 2. What is the result?" + INSTRUCTION)
    with pytest.raises(CritiqueError, match=r"rollout_id 'p0#0'.*prompt_id 'p0'.*problem text"):
        critique_rows([row], params, make_critic("reference", params, ""), templates_for(params))
