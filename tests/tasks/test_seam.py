"""The task seam: every task module exports every name of the contract written in tasks/__init__.py."""

import importlib
import re

import pytest

import finetune.tasks as tasks

CONTRACT = set(re.findall(r"^    ([A-Z_]+|[a-z_]+)[:(]", tasks.__doc__, re.M))


def test_the_contract_names_what_the_stages_call():
    assert {"encode_labels", "loss_sum", "scores", "decide", "prepare_labels", "GATE_METRICS"} <= CONTRACT


@pytest.mark.parametrize("name", [n for n, module in tasks.TASKS.items() if module])
def test_each_task_module_exports_the_whole_contract(name):
    module = importlib.import_module(f"finetune.tasks.{tasks.TASKS[name]}")
    assert sorted(n for n in CONTRACT if not hasattr(module, n)) == []
    assert module.NAME == name and module.SELECT_METRICS[0] == "val_loss"
