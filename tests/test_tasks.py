"""Tests for fltasks: built-in tasks, the train step, partitions and the task loader."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fltasks import (
    Task,
    TaskError,
    breast_cancer,
    digits,
    load_task,
    parse_partition,
    partition,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digits_task() -> Task:
    return digits(seed=0)


@pytest.fixture
def user_tasks_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tasks -------------------------------------------------------------------------------


def test_make_model_returns_identical_weights_on_every_call(digits_task: Task) -> None:
    assert _same_state(digits_task.make_model(), digits_task.make_model())


def test_make_model_depends_on_task_seed() -> None:
    assert not _same_state(digits(seed=0).make_model(), digits(seed=1).make_model())


def test_make_model_leaves_global_rng_untouched(digits_task: Task) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digits_task.make_model()
    assert torch.equal(torch.rand(3), expected)


def test_digits_shapes_and_parameter_count(digits_task: Task) -> None:
    t = digits_task
    assert t.num_parameters() == 4810
    assert len(t.x_train) + len(t.x_test) == 1797
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    assert t.x_train.shape[1] == 64 and t.num_classes == 10


def test_features_are_standardized_with_train_statistics(digits_task: Task) -> None:
    std = digits_task.x_train.std(dim=0, unbiased=False)
    varying = std > 0
    assert torch.allclose(digits_task.x_train.mean(dim=0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)


def test_split_is_stratified(digits_task: Task) -> None:
    train = torch.bincount(digits_task.y_train, minlength=10) / len(digits_task.y_train)
    test = torch.bincount(digits_task.y_test, minlength=10) / len(digits_task.y_test)
    assert torch.allclose(train, test, atol=0.01)


def test_centralized_training_reaches_95_percent_on_digits(digits_task: Task) -> None:
    model = digits_task.make_model()
    assert digits_task.evaluate(model) < 0.5
    gen = torch.Generator().manual_seed(0)
    digits_task.train(model, digits_task.x_train, digits_task.y_train, 20, gen)
    assert digits_task.evaluate(model) >= 0.95


def test_train_is_deterministic_under_generator_and_lowers_loss(digits_task: Task) -> None:
    x, y = digits_task.x_train[:200], digits_task.y_train[:200]
    models = [digits_task.make_model() for _ in range(2)]
    losses = [digits_task.train(m, x, y, 3, torch.Generator().manual_seed(7)) for m in models]
    assert losses[0] == losses[1]
    assert _same_state(models[0], models[1])
    later = digits_task.train(models[0], x, y, 3, torch.Generator().manual_seed(7))
    assert later < losses[0]


def test_evaluate_on_given_split(digits_task: Task) -> None:
    model = digits_task.make_model()
    x, y = digits_task.x_train[:50], digits_task.y_train[:50]
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert digits_task.evaluate(model, x, y) == pytest.approx(expected)
    with pytest.raises(ValueError, match="both x and y"):
        digits_task.evaluate(model, x)


def test_train_rejects_empty_shard(digits_task: Task) -> None:
    with pytest.raises(ValueError, match="empty shard"):
        digits_task.train(digits_task.make_model(), digits_task.x_train[:0],
                          digits_task.y_train[:0], 1, torch.Generator())


def test_breast_cancer_is_two_class_and_learnable() -> None:
    task = breast_cancer(seed=0)
    assert task.num_classes == 2 and task.x_train.shape[1] == 30
    model = task.make_model()
    task.train(model, task.x_train, task.y_train, 10, torch.Generator().manual_seed(0))
    assert task.evaluate(model) >= 0.9


def test_task_rejects_wrong_label_dtype(digits_task: Task) -> None:
    with pytest.raises(TaskError, match="y_train must be a 1-D int64"):
        Task(name="bad", make_model=digits_task.make_model,
             x_train=digits_task.x_train, y_train=digits_task.y_train.float(),
             x_test=digits_task.x_test, y_test=digits_task.y_test,
             num_classes=10, lr=0.1, batch_size=32)


# --- partitions --------------------------------------------------------------------------


SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:1000", "quantity:0.1", "quantity:5"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_shards", [1, 10, 300])
def test_partition_is_disjoint_covering_and_non_empty(
    digits_task: Task, scheme: str, num_shards: int
) -> None:
    shards = partition(digits_task.y_train, num_shards, scheme, seed=3)
    assert len(shards) == num_shards
    assert min(len(s) for s in shards) >= 2
    merged = np.concatenate(shards)
    assert len(merged) == len(digits_task.y_train)
    assert np.array_equal(np.sort(merged), np.arange(len(digits_task.y_train)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_deterministic_under_seed(digits_task: Task, scheme: str) -> None:
    def draw(seed: int) -> list[np.ndarray]:
        return partition(digits_task.y_train, 10, scheme, seed=seed)

    assert all(np.array_equal(a, b) for a, b in zip(draw(1), draw(1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(draw(1), draw(2), strict=True))


def test_partition_with_more_shards_than_twice_the_samples_gives_one_each() -> None:
    shards = partition(np.zeros(5, dtype=np.int64), 4, "dirichlet:0.1", seed=0)
    assert min(len(s) for s in shards) == 1
    assert sum(len(s) for s in shards) == 5


def test_partition_rejects_more_shards_than_samples() -> None:
    with pytest.raises(ValueError, match="at most 5 shards"):
        partition(np.zeros(5, dtype=np.int64), 6, "iid", seed=0)


def _top_label_share(labels: np.ndarray, shards: list[np.ndarray], top: int) -> np.ndarray:
    shares = []
    for shard in shards:
        counts = np.sort(np.bincount(labels[shard], minlength=10))[::-1]
        shares.append(counts[:top].sum() / len(shard))
    return np.array(shares)


def test_dirichlet_small_alpha_skews_labels_and_iid_does_not(digits_task: Task) -> None:
    y = digits_task.y_train.numpy()
    skewed = _top_label_share(y, partition(y, 10, "dirichlet:0.1", seed=0), top=2)
    iid = _top_label_share(y, partition(y, 10, "iid", seed=0), top=2)
    assert np.mean(skewed >= 0.8) >= 0.7
    assert iid.max() < 0.35


def test_quantity_skew_gives_unequal_sizes_and_iid_equal(digits_task: Task) -> None:
    y = digits_task.y_train
    skewed = [len(s) for s in partition(y, 10, "quantity:0.3", seed=0)]
    iid = [len(s) for s in partition(y, 10, "iid", seed=0)]
    assert max(skewed) > 3 * min(skewed)
    assert max(iid) - min(iid) <= 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("iid", ("iid", None)),
        ("dirichlet:0.5", ("dirichlet", 0.5)),
        ("quantity:2", ("quantity", 2.0)),
    ],
)
def test_parse_partition_accepts_documented_forms(text: str, expected: tuple) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    "text", ["foo", "dirichlet:abc", "dirichlet:-1", "dirichlet:0", "dirichlet", "quantity:nan",
             "iid:1", "dirichlet:inf", ""],
)
def test_parse_partition_rejects_bad_input_with_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="'iid', 'dirichlet:ALPHA' or 'quantity:ALPHA'") as info:
        parse_partition(text)
    assert "\n" not in str(info.value)


# --- loading tasks -----------------------------------------------------------------------


@pytest.mark.parametrize("spec, name", [("digits", "digits"), ("breast-cancer", "breast-cancer")])
def test_load_builtin_task(spec: str, name: str) -> None:
    assert load_task(spec).name == name


def test_load_task_passes_seed() -> None:
    assert not _same_state(load_task("digits", seed=0).make_model(),
                           load_task("digits", seed=5).make_model())


@pytest.mark.usefixtures("user_tasks_on_path")
def test_load_user_task_from_module_function() -> None:
    task = load_task("user_task_example:make_task", seed=2)
    assert isinstance(task, Task) and task.name == "iris"
    model = task.make_model()
    task.train(model, task.x_train, task.y_train, 20, torch.Generator().manual_seed(0))
    assert task.evaluate(model) >= 0.8


@pytest.mark.usefixtures("user_tasks_on_path")
@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist", "unknown task 'mnist': use one of digits, breast-cancer"),
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("user_task_example:missing", "has no attribute 'missing'"),
        ("user_task_example:NOT_CALLABLE", "is a int, not a function"),
        ("user_task_example:no_seed", "must accept a 'seed' keyword"),
        ("user_task_example:not_a_task", "returned a dict, expected a fltasks.Task"),
        (":make_task", "expected 'module:function'"),
        ("user_task_example:", "expected 'module:function'"),
    ],
)
def test_load_task_errors_are_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(TaskError) as info:
        load_task(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bundled_data_equals_scikit_learns_loaders() -> None:
    from sklearn.datasets import load_breast_cancer, load_digits

    from fltasks.datasets import load_breast_cancer_arrays, load_digits_arrays

    for ours, theirs in ((load_digits_arrays(), load_digits()),
                         (load_breast_cancer_arrays(), load_breast_cancer())):
        assert np.array_equal(ours[0], theirs.data)
        assert np.array_equal(ours[1], theirs.target)


def test_stratified_split_keeps_label_proportions_and_is_seeded() -> None:
    from fltasks.datasets import load_digits_arrays, stratified_split

    _, y = load_digits_arrays()
    train, test = stratified_split(y, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    for label in range(10):
        share = np.mean(y[test] == label) / np.mean(y == label)
        assert 0.9 < share < 1.1
    assert np.array_equal(stratified_split(y, seed=0)[1], test)
    assert not np.array_equal(stratified_split(y, seed=1)[1], test)


def test_missing_bundled_data_is_one_clear_task_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import fltasks.datasets as datasets
    from fltasks import TaskError

    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TaskError, match="scikit-learn is not installed"):
        datasets.digits()
