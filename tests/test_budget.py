"""Budget arithmetic against parameter counts worked out by hand (in comments) for roberta-base and the
offline backbone (all-MiniLM-L6-v2)."""

from __future__ import annotations

import pytest
import torch

from fwlora import models
from fwlora.budget import colliding_budgets, make_budget, rank_for_budget, smallest_budget_percent
from fwlora.errors import UserError

# roberta-base (RobertaForSequenceClassification, which builds no pooler):
#   embeddings 50265*768 + 514*768 + 1*768 + LayerNorm 2*768                  = 39,000,576
#   per layer: q, k, v, o 4*(768*768 + 768) = 2,362,368; FFN in 768*3072 + 3072 = 2,362,368;
#              FFN out 3072*768 + 768 = 2,360,064; two LayerNorms 2*1536 = 3,072  -> 7,087,872
#   backbone = 39,000,576 + 12 * 7,087,872                                     = 124,055,040
#   head: classifier.dense 768*768 + 768 + out_proj 768*2 + 2                  = 592,130
#   LoRA parameters per unit of rank: 12 * (4*(768 + 768) + (768 + 3072) + (3072 + 768)) = 165,888
ROBERTA_BACKBONE, ROBERTA_HEAD, ROBERTA_PER_RANK = 124_055_040, 592_130, 165_888
# all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; the pooler belongs to the head):
#   embeddings 30522*384 + 512*384 + 2*384 + 2*384 = 11,918,592
#   per layer: 4*(384*384 + 384) + (384*1536 + 1536) + (1536*384 + 384) + 2*768 = 1,774,464
#   backbone = 11,918,592 + 6 * 1,774,464 = 22,565,376; per rank 6 * (4*768 + 2*1920) = 41,472
MINILM_BACKBONE, MINILM_PER_RANK = 22_565_376, 41_472


def roberta_base_on_meta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    with torch.device("meta"):  # roberta-base's shapes without allocating (or downloading) its weights
        return RobertaForSequenceClassification(config)


def test_roberta_base_counts_match_the_hand_computation():
    model = roberta_base_on_meta()
    targets = models.resolve_targets(model)
    counts = models.count_params(model, targets)
    assert (counts.backbone, counts.head, counts.per_rank) == (ROBERTA_BACKBONE, ROBERTA_HEAD, ROBERTA_PER_RANK)
    assert counts.adapted_matrices == 72


@pytest.mark.parametrize("percent,rank", [(0.1, 1), (0.2, 2), (0.5, 4)])
def test_roberta_base_budgets_map_to_the_protocol_ranks(percent, rank):
    # 0.1 %: 124,055 / 165,888 = 0.748 -> 1;  0.2 %: 1.496 >= sqrt(1*2) = 1.414 -> 2;  0.5 %: 3.739 >= sqrt(12) -> 4
    assert rank_for_budget(percent, ROBERTA_PER_RANK, ROBERTA_BACKBONE) == rank


def test_offline_backbone_counts_and_ranks():
    model, _ = models.load_backbone("minilm", 2, "mean")
    counts = models.count_params(model, models.resolve_targets(model))
    assert (counts.backbone, counts.head, counts.per_rank) == (MINILM_BACKBONE, 384 * 2 + 2, MINILM_PER_RANK)
    cls_model, _ = models.load_backbone("minilm", 2, "model")
    cls_counts = models.count_params(cls_model, models.resolve_targets(cls_model))
    assert cls_counts.backbone == MINILM_BACKBONE  # the pooler counts as head, so the budget is the same
    assert cls_counts.head == 384 * 384 + 384 + 384 * 2 + 2
    # 0.1 %: 0.544 -> 1; 0.2 %: 1.088 -> 1; 0.5 %: 2.721 >= sqrt(6) = 2.449 -> 3
    assert [rank_for_budget(p, MINILM_PER_RANK, MINILM_BACKBONE) for p in (0.1, 0.2, 0.5)] == [1, 1, 3]
    assert colliding_budgets([0.1, 0.2, 0.5], MINILM_PER_RANK, MINILM_BACKBONE) == {1: [0.1, 0.2]}


def test_budget_below_rank_one_names_the_smallest_budget():
    # rank 1 = 41,472 / 22,565,376 = 0.1838 %; the smallest budget accepted is half of it, 0.0919 %
    assert smallest_budget_percent(MINILM_PER_RANK, MINILM_BACKBONE) == pytest.approx(0.091893, rel=1e-4)
    with pytest.raises(UserError, match=r"below rank 1.*smallest budget possible is 0\.092 %"):
        rank_for_budget(0.05, MINILM_PER_RANK, MINILM_BACKBONE)
    assert rank_for_budget(0.092, MINILM_PER_RANK, MINILM_BACKBONE) == 1


def test_make_budget_records_actual_percent():
    b = make_budget(ROBERTA_PER_RANK, ROBERTA_BACKBONE, ROBERTA_HEAD, percent=0.2)
    assert b.rank == 2 and b.adapter_params == 331_776
    assert b.percent == pytest.approx(100 * 331_776 / 124_055_040)  # 0.2674 %
    assert make_budget(ROBERTA_PER_RANK, ROBERTA_BACKBONE, ROBERTA_HEAD, rank=4).adapter_params == 663_552
    with pytest.raises(UserError, match="exactly one"):
        make_budget(1, 1, 0, rank=1, percent=0.1)


@pytest.mark.parametrize("rank,expected", [(1, (2, 1)), (2, (3, 2)), (4, (6, 4)), (8, (12, 8))])
def test_adalora_ranks_for_parity(rank, expected):
    from fwlora.methods.adalora.plugin import adalora_ranks

    assert adalora_ranks(rank) == expected
