"""The product's view of ingest: one prompt text, cited anchors turned into passages."""

import pytest

from salachat.documents import cited_passages, load_documents
from salachat.errors import BAD_INPUT, UserError


def test_cited_pages_of_the_sample_become_their_passages():
    documents = load_documents(["assets/sample.pdf"])
    assert "[p.3]" in documents.prompt_text
    passages = cited_passages(documents, "Tomas Brandt kept it [p.3]; the light dates from 1871 [p.2] [p.99].")
    assert [p.anchor for p in passages] == ["p.3", "p.2"]  # p.99 does not exist and is dropped
    assert "Tomas Brandt" in passages[0].text and "1871" in passages[1].text


def test_unreadable_input_is_a_user_error_with_exit_code_3(tmp_path):
    with pytest.raises(UserError) as caught:
        load_documents([tmp_path / "missing.pdf"])
    assert caught.value.code == BAD_INPUT and "missing.pdf" in str(caught.value)


def test_a_reading_longer_than_the_model_can_take_is_refused_with_the_figures(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("a few words of a long text\n" * 200_000)  # 5.4 MB, about 1.35M tokens
    with pytest.raises(UserError) as caught:
        load_documents([path], max_tokens=100_000)
    message = str(caught.value)
    assert caught.value.code == BAD_INPUT and "\n" not in message
    assert message.startswith(f"{path}: is too long to read: 5.4 MB, about 1,350,000 tokens, more than the "
                              "100,000 tokens the model can read")
    assert len(load_documents([path]).docs[0].segments) > 100  # the default limit takes it


def test_a_document_of_only_whitespace_is_refused_although_the_prompt_has_a_header(tmp_path):
    path = tmp_path / "blank.md"
    path.write_text("\n   \n\t\n")
    with pytest.raises(UserError, match=r"blank\.md: has no text \(only whitespace\)") as caught:
        load_documents([path])
    assert caught.value.code == BAD_INPUT


def test_the_plan_is_shown_before_reading_and_its_refusal_is_a_user_error(tmp_path):
    from salachat.documents import check_plan, plan_documents

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "main.py").write_text("print('hi')\n")
    (tmp_path / "repo" / ".env.local").write_text("SECRET=1\n")
    plan = plan_documents([tmp_path / "repo", "assets/sample.pdf"], max_tokens=100_000)
    assert plan.fits and plan.items[1].units == 5 and plan.items[1].anchors == ["p.1", "p.5"]
    assert "    skipped .env.local: looks like a credential" in plan.lines()
    check_plan(plan)
    tight = plan_documents(["assets/sample.pdf"], max_tokens=10)
    with pytest.raises(UserError, match=r"sample\.pdf: is too long to read: .* more than the 10 tokens") as caught:
        check_plan(tight)
    assert caught.value.code == BAD_INPUT
