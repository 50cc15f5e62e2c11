"""A developer's own task, loaded in tests as 'user_task_example:make_task'.

It shows the whole user API: build data and a seeded model, return a `Task`.
"""

from functools import partial

from sklearn.datasets import load_iris

from fltasks import Task
from fltasks.datasets import mlp, split_and_standardize


def make_task(seed: int = 0) -> Task:
    """Iris (150 samples, 3 classes) with a linear model."""
    data = load_iris()
    x_train, y_train, x_test, y_test = split_and_standardize(data.data, data.target, seed)
    return Task(
        name="iris",
        make_model=partial(mlp, (4, 3), seed),
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=3, lr=0.1, batch_size=16,
    )


def not_a_task(seed: int = 0) -> dict:
    """Returns the wrong type, for the loader's error path."""
    return {"seed": seed}


def no_seed() -> Task:
    """Does not accept `seed`, for the loader's error path."""
    return make_task()


NOT_CALLABLE = 42
