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
