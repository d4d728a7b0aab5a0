import datasets
import pytest

from did_cli.errors import UsageError
from did_cli.evaluation.nll_rows import read_documents
from did_cli.evaluation.zero_shot import (
    PRESETS,
    detokenize_lambada,
    detokenize_lm1b,
    detokenize_ptb,
    detokenize_scientific_papers,
    detokenize_wikitext,
    get_preset,
)


def test_wikitext_detokeniser():
    line = ' = = Early life = = \n The 1 @,@ 000 @-@ year @-@ old city ( near the " old " river ) is 3 @.@ 5 km long . '
    assert (
        detokenize_wikitext(line)
        == ' == Early life ==\nThe 1,000-year-old city (near the "old" river) is 3.5 km long. '
    )
    assert detokenize_wikitext("the players ' union said , N times : yes ; no") == (
        "the players' union said, 1 times: yes; no"
    )
    assert detokenize_wikitext("it 's 20 ° C") == "it's 20°C"


def test_ptb_detokeniser():
    line = "the company 's N N shares did n't rise \\/ fall <unk> $ N million"
    assert detokenize_ptb(line) == "the company's 1 1 shares didn't rise / fall ? $1 million"
    assert detokenize_ptb("investors ' funds") == "investors' funds"


def test_lm1b_detokeniser():
    line = 'He said " see http : / / example.com " ( twice ) , then left .'
    assert detokenize_lm1b(line) == 'He said "see http://example.com" (twice), then left.'
    assert detokenize_lm1b("Is it $ 5 or £ 3 ?") == "Is it $5 or £3?"
    assert detokenize_lm1b("We 're here ! Go : now ; 1 / 2") == "We're here! Go: now; 1/2"


def test_lambada_and_scientific_papers_detokenisers():
    assert detokenize_lambada("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'
    assert detokenize_scientific_papers("the value @-@ based model ( see fig . 1 ) and more .") == (
        "the value-based model (see fig. 1) and more."
    )


def test_every_preset_names_a_dataset_split_and_field():
    assert {"wikitext-103", "ptb", "lm1b", "lambada", "ag_news", "scientific_papers_pubmed"} <= set(PRESETS)
    assert get_preset("lm1b").split == "test" and get_preset("ptb").text_field == "sentence"
    with pytest.raises(UsageError, match="unknown preset 'wikitext-3'; choose one of wikitext-103"):
        get_preset("wikitext-3")


@pytest.mark.parametrize(
    "name,dataset,config,split,field,raw,clean",
    [
        ("wikitext-103", "wikitext", "wikitext-103-raw-v1", "validation", "text", " a @-@ b . \n", " a-b.\n"),
        ("ptb", "ptb_text_only", None, "validation", "sentence", "it 's N shares", "it's 1 shares"),
        ("ag_news", "ag_news", None, "test", "text", "As is , here", "As is , here"),
        ("scientific_papers_arxiv", "scientific_papers", "arxiv", "validation", "article", "x ( y )", "x (y)"),
    ],
)
def test_preset_loading_reads_the_right_dataset_and_detokenises(
    monkeypatch, name, dataset, config, split, field, raw, clean
):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({field: [raw, "  ", raw], "other": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts, source = read_documents(None, name)
    assert calls == [(dataset, config, split)]
    assert texts == [clean, clean]  # the blank document is dropped, as training drops it
    assert source["preset"] == name


def test_exactly_one_data_source():
    with pytest.raises(UsageError, match="exactly one"):
        read_documents(None, None)
    with pytest.raises(UsageError, match="exactly one"):
        read_documents("x.txt", "ptb")
