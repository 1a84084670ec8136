"""fastlm-train's data preparation: the tokenizer trained on the corpus, or read from the cache."""

from fastlm.train import data


def test_train_tokenizer_says_whether_it_trained_or_read_the_cache(tmp_path, capsys):
    docs = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(50)]
    first = data.train_tokenizer(docs, 300, "ab" * 32, tmp_path)
    (cached,) = (tmp_path / "tokenizers").iterdir()
    assert capsys.readouterr().err == (f"fastlm-train: training a 300-token byte-level BPE on the corpus (saved in "
                                       f"{cached} for later runs)\n")
    second = data.train_tokenizer(docs, 300, "ab" * 32, tmp_path)
    assert capsys.readouterr().err == f"fastlm-train: using the 300-token byte-level BPE of this corpus cached in {cached}\n"
    assert second.to_str() == first.to_str()
