"""The book's chapter-6 dataset: the SMS Spam Collection (Almeida and Gómez Hidalgo, 2011)
from the UCI Machine Learning Repository, 5,574 text messages labelled "ham" or "spam".

The archive holds one file, SMSSpamCollection: no header, one message per line as
"label<TAB>text". `download_sms_spam` turns it into a TSV with a header row (Label, Text),
the columns the book's DataFrame uses, so that

    tinygpt finetune-classify --data DIR/sms_spam.tsv --text-column Text --label-column Label --balance

trains on it as the book does.
"""
from __future__ import annotations

import csv
import io
import os
import urllib.request
import zipfile
from pathlib import Path

from tinygpt.errors import RunError
from tinygpt.files import atomic_write_text

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_MEMBER = "SMSSpamCollection"


def download_sms_spam(out_dir: str | os.PathLike = "data", url: str | None = None, timeout: float = 60) -> Path:
    """Download and unpack the collection (from SMS_SPAM_URL unless `url` is given) into
    out_dir/sms_spam.tsv, once; returns its path."""
    url = url or SMS_SPAM_URL
    target = Path(out_dir) / "sms_spam.tsv"
    if target.exists():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            archive = response.read()
    except OSError as e:
        raise RunError(f"could not download the SMS Spam Collection from {url} ({e}). Without network, fetch "
                       f"that zip file elsewhere, unpack {SMS_SPAM_MEMBER} and pass a CSV/TSV with a header row "
                       f"to --data instead") from e
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            raw = z.read(SMS_SPAM_MEMBER).decode("utf-8")
    except (zipfile.BadZipFile, KeyError) as e:
        raise RunError(f"{url} did not give a zip archive holding {SMS_SPAM_MEMBER} ({e})") from e
    rows = io.StringIO()
    writer = csv.writer(rows, delimiter="\t", lineterminator="\n")
    writer.writerow(["Label", "Text"])
    for line_number, line in enumerate(raw.split("\n"), start=1):  # not splitlines(): texts may hold \x0c or \u2028
        if not line.strip():
            continue
        label, sep, text = line.removesuffix("\r").partition("\t")
        if not sep:
            raise RunError(f"{SMS_SPAM_MEMBER}, line {line_number}: expected 'label<TAB>text', got {line[:60]!r}")
        writer.writerow([label, text])
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, rows.getvalue())
    return target
