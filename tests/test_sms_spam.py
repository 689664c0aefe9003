"""The SMS Spam Collection downloader and `tinygpt download sms-spam`, served from a zip file
written here (file:// URLs), so no test touches the network."""
import functools
import re
import zipfile

import pytest

from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main
from tinygpt.finetune import sms_spam
from tinygpt.finetune.classify import read_labelled_file
from tinygpt.finetune.sms_spam import download_sms_spam
from test_finetune_cli import save_char_base

# (label, text) as in the archive's SMSSpamCollection: quotes and tabs inside a message are
# the cases a TSV writer and reader can get wrong
MESSAGES = [
    ("ham", "Go until jurong point, crazy.. Available only in bugis n great world la e buffet..."),
    ("spam", 'WIN "cash" now'),
    ("ham", '"Quoted" at the start, and an unbalanced " in the middle'),
    ("ham", "see\tyou later"),
    ("spam", "FREE entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121"),
    ("ham", "Nah I don't think he goes to usf, he lives around here though"),
]


def write_zip(path, text, member="SMSSpamCollection"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, text.encode("utf-8"))
    return path


@pytest.fixture
def archive(tmp_path):
    """The collection's zip layout: one member, "label<TAB>text" lines; a blank line and one
    Windows line ending on the way."""
    lines = [f"{label}\t{text}" for label, text in MESSAGES]
    text = "\n".join(lines[:3]) + "\r\n" + "\n".join(lines[3:]) + "\n\n"
    return write_zip(tmp_path / "sms+spam+collection.zip", text)


def test_download_writes_a_tsv_with_a_header_that_reads_back_exactly(archive, tmp_path):
    path = download_sms_spam(tmp_path / "data", url=archive.as_uri())
    assert path == tmp_path / "data" / "sms_spam.tsv"
    assert path.read_text(encoding="utf-8").splitlines()[0] == "Label\tText"
    texts, labels = read_labelled_file(path, "Text", "Label")
    assert texts == [text for _, text in MESSAGES]
    assert labels == [label for label, _ in MESSAGES]


def test_a_second_download_keeps_the_file_it_has(archive, tmp_path):
    first = download_sms_spam(tmp_path, url=archive.as_uri())
    content = first.read_text(encoding="utf-8")
    assert download_sms_spam(tmp_path, url="http://127.0.0.1:9/never-asked.zip", timeout=1) == first
    assert first.read_text(encoding="utf-8") == content


def test_a_message_holding_a_unicode_line_separator_stays_one_message(tmp_path):
    # only "\n" (or "\r\n") ends a record; pandas, which the book reads the file with, agrees
    archive = write_zip(tmp_path / "sms.zip", "ham\tline one\u2028line two\nspam\tcall now\n")
    texts, labels = read_labelled_file(download_sms_spam(tmp_path, url=archive.as_uri()), "Text", "Label")
    assert (texts, labels) == (["line one\u2028line two", "call now"], ["ham", "spam"])


def test_an_unreachable_url_says_which_and_suggests_data(tmp_path):
    url = "http://127.0.0.1:9/sms.zip"  # the discard port on this machine: refused, nothing leaves it
    with pytest.raises(RuntimeError, match=re.escape(f"from {url} (")) as error:
        download_sms_spam(tmp_path, url=url, timeout=5)
    assert "--data" in str(error.value)
    assert not (tmp_path / "sms_spam.tsv").exists()


def test_a_payload_that_is_not_the_archive_is_refused(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>moved</html>")
    refused = f"{page.as_uri()} did not give a zip archive holding SMSSpamCollection"
    with pytest.raises(RuntimeError, match=re.escape(refused)):
        download_sms_spam(tmp_path, url=page.as_uri())
    other = write_zip(tmp_path / "other.zip", "ham\thello\n", member="readme.txt")
    with pytest.raises(RuntimeError, match="did not give a zip archive holding SMSSpamCollection"):
        download_sms_spam(tmp_path, url=other.as_uri())
    assert not (tmp_path / "sms_spam.tsv").exists()


def test_a_line_without_a_tab_is_reported_with_its_number(tmp_path):
    archive = write_zip(tmp_path / "sms.zip", "ham\thello\nspam no tab here\n")
    with pytest.raises(RuntimeError, match=r"SMSSpamCollection, line 2: expected 'label<TAB>text', got 'spam no tab here'"):
        download_sms_spam(tmp_path, url=archive.as_uri())
    assert not (tmp_path / "sms_spam.tsv").exists()


def test_download_command_writes_to_data_by_default_and_its_suggested_command_trains(archive, tmp_path, capsys,
                                                                                      monkeypatch):
    # the default URL is bound when the function is defined, so the test points the
    # command at the local archive by replacing the function it imports
    monkeypatch.setattr(sms_spam, "download_sms_spam", functools.partial(download_sms_spam, url=archive.as_uri()))
    monkeypatch.chdir(tmp_path)
    assert main(["download", "sms-spam"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "data" / "sms_spam.tsv"
    assert path.exists()
    suggested = "tinygpt finetune-classify --data data/sms_spam.tsv --text-column Text --label-column Label --balance"
    assert printed == f"data/sms_spam.tsv; finetune with: {suggested}\n"

    assert main(["download", "sms-spam", "--dir", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'elsewhere' / 'sms_spam.tsv'}; finetune with:")

    base = save_char_base(tmp_path / "base")
    command = suggested.split()[1:] + ["--init", str(base), "--out", "run", "--batch-size", "2", "--max-steps", "1",
                                       "--train-frac", "0.5", "--val-frac", "0.25", "--no-progress"]
    assert main(command) == 0, capsys.readouterr().err
    meta = load_checkpoint(tmp_path / "run").trainer_state["meta"]
    assert meta["labels"] == ["ham", "spam"] and meta["balance"] is True
    assert "4 texts" in capsys.readouterr().out  # balanced: the 2 spam messages and 2 of the 4 ham ones
