"""The Django catalog reader on the real installed catalogs, the deterministic split and the file loader."""

from __future__ import annotations

import json

import pytest

from neft_trl.demo.data import (
    TranslationPair,
    django_locale_files,
    django_pairs,
    load_pairs_file,
    read_catalog,
    split_pairs,
    to_prompt_completion,
    translation_prompt,
)


@pytest.mark.parametrize("lang", ["de", "fr", "zh_Hans"])
def test_django_pairs_are_real_nonempty_and_unique(lang):
    pairs = django_pairs(lang)
    assert len(pairs) > 500  # Django 5.x ships ~800 usable strings per major language
    assert len({p.source for p in pairs}) == len(pairs)
    assert all(p.source.strip() == p.source and p.source and p.target for p in pairs)
    assert all(any(ch.isalpha() for ch in p.source) for p in pairs)
    assert not any("\x04" in p.source for p in pairs)  # gettext contexts stripped
    assert any(p.source == "Remove" for p in pairs)


def test_german_pairs_hold_known_translations_and_respect_max_chars():
    pairs = {p.source: p.target for p in django_pairs("de")}
    assert pairs["December"] == "Dezember"
    assert pairs["Password reset"] == "Passwort zurücksetzen"
    short = django_pairs("de", max_chars=30)
    assert 0 < len(short) < len(pairs)
    assert all(len(p.source) <= 30 and len(p.target) <= 30 for p in short)


def test_read_catalog_skips_header_plural_forms_and_placeholder_only(tmp_path):
    files = django_locale_files("de")
    assert all(f.suffix == ".mo" and "/locale/de/LC_MESSAGES/" in f.as_posix() for f in files)
    pairs = [p for f in files for p in read_catalog(f)]
    assert all(p.source for p in pairs)  # the "" header entry is gone
    plural = [p for p in pairs if p.source == "%(counter)s result"]
    assert plural and plural[0].target == "%(counter)s Ergebnis"  # singular form of a plural entry
    assert not any(p.source in {"%s", "%(value)s"} for p in pairs)


def test_unknown_language_names_the_available_ones():
    with pytest.raises(ValueError, match="Available: .*de"):
        django_locale_files("xx_NOPE")


def test_split_is_deterministic_disjoint_and_stable():
    pairs = django_pairs("de", max_chars=60)
    train, test = split_pairs(pairs, 100, seed=0)
    assert len(test) == 100 and len(train) == len(pairs) - 100
    assert not {p.source for p in train} & {p.source for p in test}
    assert split_pairs(pairs, 100, seed=0) == (train, test)
    assert split_pairs(pairs, 100, seed=1)[1] != test
    # a pair's side does not depend on the rest of the list: drop half the train pairs, the test side holds
    assert split_pairs(train[::2] + test, 100, seed=0)[1] == test
    shuffled = list(reversed(pairs))
    assert sorted(split_pairs(shuffled, 100, seed=0)[1], key=lambda p: p.source) == sorted(test, key=lambda p: p.source)
    assert len(split_pairs(pairs, 0.2)[1]) == round(len(pairs) * 0.2)


@pytest.mark.parametrize("bad", [0, 1.5, 10_000])
def test_split_rejects_sizes_that_leave_a_side_empty(bad):
    with pytest.raises(ValueError, match="test_size"):
        split_pairs([TranslationPair("a", "b"), TranslationPair("c", "d")], bad)


def test_prompt_completion_formats():
    pairs = [TranslationPair("Close", "Schließen")]
    plain = to_prompt_completion(pairs, "German", conversational=False)
    assert plain[0]["prompt"] == "Translate the following text from English to German. Close\n"
    assert plain[0]["completion"] == "Schließen" and plain[0]["target"] == "Schließen"
    chat = to_prompt_completion(pairs, "German")
    assert chat[0]["prompt"] == [{"role": "user", "content": translation_prompt("Close", "de")}]
    assert chat[0]["completion"] == [{"role": "assistant", "content": "Schließen"}]
    with pytest.raises(ValueError, match="No translation pairs"):
        to_prompt_completion([], "German")


def test_load_pairs_file_jsonl_with_column_options(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"en": "Hello", "de": "Hallo"}, {"en": "  ", "de": "leer"}, {"en": "Good day", "de": "Guten Tag"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs_file(path, source_column="en", target_column="de")
    assert pairs == [TranslationPair("Hello", "Hallo"), TranslationPair("Good day", "Guten Tag")]
    with pytest.raises(ValueError, match=r"no column\(s\) \['source'\].*columns are \['en', 'de'\]"):
        load_pairs_file(path, target_column="de")


def test_pair_datasets_split_a_pairs_file_into_train_dev_test_by_the_seeded_hash(tmp_path):
    from neft_trl.demo.arguments import PairDataArguments, pair_datasets

    rows = [{"en": f"sentence {i}", "fr": f"phrase {i}"} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = PairDataArguments(dataset=str(tmp_path / "pairs.jsonl"), source_column="en", target_column="fr",
                             lang="French", test_size=6, dev_size=4)
    train, dev, test = pair_datasets(args, chat=False, seed=3)
    assert (len(train), len(dev), len(test)) == (20, 4, 6)
    pairs = [TranslationPair(r["en"], r["fr"]) for r in rows]
    rest, held_out = split_pairs(pairs, 6, seed=3)
    assert test["source"] == [p.source for p in held_out]
    assert dev["source"] == [p.source for p in split_pairs(rest, 4, seed=3)[1]]
    assert set(train["source"]) | set(dev["source"]) | set(test["source"]) == {r["en"] for r in rows}
    assert test[0]["prompt"] == translation_prompt(test[0]["source"], "French") + "\n"
    assert len(pair_datasets(PairDataArguments(dataset=args.dataset, source_column="en", target_column="fr",
                                               test_size=6), chat=True, seed=3)) == 2  # no dev split by default
