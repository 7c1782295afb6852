"""Data splits, models and a short run of every unlearning method on a slice of the bundled digits."""

import copy

import pytest
import torch
import torch.nn.functional as F

from concept_erase.classification import methods as M
from concept_erase.classification.config import ForgetSpec
from concept_erase.classification.data import ClassificationData, load_digits_data, split_forget
from concept_erase.classification.metrics import accuracy, predict_logits
from concept_erase.classification.models import build_model
from concept_erase.errors import ConceptEraseError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny CNN runs fastest on one thread (as the runner's default); restored for other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits_data()


@pytest.fixture(scope="module")
def small(digits):
    """300 training images of digits 0-2 and a small CNN trained on them."""
    keep = digits.y_train < 3
    d = ClassificationData("digits", 3, digits.x_train[keep][:300], digits.y_train[keep][:300],
                           digits.x_val, digits.y_val, digits.x_test, digits.y_test)
    torch.manual_seed(0)
    model = build_model("cnn", 3, 1, width=8)
    M.train_classifier(model, d.x_train, d.y_train, M.SGDConfig(epochs=8, lr=0.05), torch.Generator().manual_seed(0))
    task = M.UnlearnTask(d, split_forget(d, ForgetSpec.parse("class:1")))
    return d, task, model


def test_digits_split_is_fixed_and_disjoint(digits):
    again = load_digits_data()
    assert torch.equal(digits.x_train, again.x_train) and torch.equal(digits.y_test, again.y_test)
    assert (len(digits.y_train), len(digits.y_val), len(digits.y_test)) == (1259, 179, 359)
    assert digits.image_shape == (1, 8, 8) and digits.num_classes == 10
    assert abs(float(digits.x_train.mean())) < 1e-5  # standardised with the training statistics


def test_forget_spec_parse_and_errors():
    assert ForgetSpec.parse("class:3") == ForgetSpec("class", 3.0)
    assert str(ForgetSpec.parse("random:0.1")) == "random:0.1"
    for bad in ("random:1.5", "random:0", "class:-1", "class:2.5", "everything", "class:x", "pixel:3"):
        with pytest.raises(ConceptEraseError, match="forget"):
            ForgetSpec.parse(bad)


def test_split_forget_class_and_random(digits):
    s = split_forget(digits, ForgetSpec.parse("class:4"))
    assert (digits.y_train[s.forget_idx] == 4).all() and (digits.y_train[s.retain_idx] != 4).all()
    assert len(s.forget_idx) + len(s.retain_idx) == len(digits.y_train)
    assert (digits.y_test[s.test_idx] != 4).all() and (digits.y_val[s.val_idx] != 4).all()
    r = split_forget(digits, ForgetSpec.parse("random:0.1"))
    assert len(r.forget_idx) == round(0.1 * len(digits.y_train)) and len(r.test_idx) == len(digits.y_test)
    assert not set(r.forget_idx.tolist()) & set(r.retain_idx.tolist())
    assert torch.equal(r.forget_idx, split_forget(digits, ForgetSpec.parse("random:0.1")).forget_idx)
    with pytest.raises(ConceptEraseError, match="class 10"):
        split_forget(digits, ForgetSpec.parse("class:10"))


def test_models_shapes():
    assert build_model("cnn", 10, 1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    resnet = build_model("resnet18", 100, 3)
    assert sum(p.numel() for p in resnet.parameters()) == pytest.approx(11.2e6, rel=0.01)  # CIFAR ResNet-18
    assert resnet.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ConceptEraseError, match="vgg"):
        build_model("vgg", 10, 3)


def test_random_other_labels_never_the_true_one():
    y = torch.arange(10).repeat(100)
    z = M.random_other_labels(y, 10, torch.Generator().manual_seed(0))
    assert (z != y).all() and set(z.tolist()) == set(range(10))


def _forget_acc(model, task):
    return accuracy(predict_logits(model, task.forget[0]), task.forget[1])


def _forget_loss(model, task):
    with torch.no_grad():
        return F.cross_entropy(model.eval()(task.forget[0]), task.forget[1]).item()


def test_every_method_runs_and_moves_the_right_way(small):
    d, task, original = small
    cfg = M.SGDConfig(epochs=3, lr=0.05)
    assert _forget_acc(original, task) > 90
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    ga = M.gradient_ascent(copy.deepcopy(original), task, cfg, gen())
    assert _forget_loss(ga, task) > _forget_loss(original, task) + 0.3  # ascent raised the forget loss

    for fn in (M.random_label, M.finetune, M.l1_sparse):
        model = fn(copy.deepcopy(original), task, cfg, gen())
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _forget_acc(M.random_label(copy.deepcopy(original), task, cfg, gen()), task) < 20

    l1 = M.l1_sparse(copy.deepcopy(original), task, cfg, gen(), alpha=1e-3)
    ft = M.finetune(copy.deepcopy(original), task, cfg, gen())
    l1_norm = sum(p.abs().sum() for p in l1.parameters())
    assert l1_norm < sum(p.abs().sum() for p in ft.parameters())  # the penalty shrinks the weights


def test_salun_trains_only_salient_weights(small):
    d, task, original = small
    mask = M.saliency_mask(original, task, keep=0.3, batch_size=64)
    assert mask.kept_fraction == pytest.approx(0.3, abs=0.01)
    model = M.salun(copy.deepcopy(original), task, M.SGDConfig(epochs=3, lr=0.05), torch.Generator().manual_seed(0),
                    mask=mask)
    assert _forget_acc(model, task) < 20
    before, after = dict(original.named_parameters()), dict(model.named_parameters())
    moved = 0
    for name, m in mask.masks.items():
        assert torch.equal(after[name][~m], before[name][~m]), name  # frozen means frozen (momentum + decay)
        moved += int((after[name][m] != before[name][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.masks.values())
    assert all(p.requires_grad for p in model.parameters())  # the mask is detached after training
