"""create_rl_sampler: seeded shuffle, sequential order, curriculum samplers loaded from config; custom dataset class."""
import textwrap

import pytest
from torch.utils.data import Dataset, RandomSampler, SequentialSampler

from verl.utils.dataset import AbstractCurriculumSampler, RLHFDataset, create_rl_sampler, get_dataset_class
from verl.utils.dataset.sampler import load_object

DATA = list(range(50))

CURRICULUM = textwrap.dedent("""
    from verl.utils.dataset.sampler import AbstractCurriculumSampler


    class HardFirst(AbstractCurriculumSampler):
        '''Yields the indices with the lowest running score first.'''

        def __init__(self, data_source, data_config):
            self.n = len(data_source)
            self.scores = [0.0] * self.n
            self.config = data_config

        def __iter__(self):
            return iter(sorted(range(self.n), key=lambda i: (self.scores[i], i)))

        def __len__(self):
            return self.n

        def update(self, batch):
            for i, s in zip(batch["index"], batch["score"]):
                self.scores[i] += s


    class NotASampler:
        def __init__(self, data_source, data_config):
            pass


    class MyDataset(__import__("torch").utils.data.Dataset):
        pass
""")


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_sampler.py"
    path.write_text(CURRICULUM)
    return str(path)


def test_shuffle_is_seeded():
    a = list(create_rl_sampler({"shuffle": True, "seed": 7}, DATA))
    b = list(create_rl_sampler({"shuffle": True, "seed": 7}, DATA))
    c = list(create_rl_sampler({"shuffle": True, "seed": 8}, DATA))
    assert isinstance(create_rl_sampler({"shuffle": True, "seed": 7}, DATA), RandomSampler)
    assert a == b and a != c and sorted(a) == DATA and a != DATA
    assert list(create_rl_sampler({"shuffle": True, "seed": None}, DATA)) == list(create_rl_sampler({}, DATA))


def test_no_shuffle_is_sequential():
    sampler = create_rl_sampler({"shuffle": False}, DATA)
    assert isinstance(sampler, SequentialSampler) and list(sampler) == DATA


def test_curriculum_sampler_from_file_gets_updates(plugin):
    config = {"sampler": {"class_path": plugin, "class_name": "HardFirst"}, "dataloader_num_workers": 0}
    sampler = create_rl_sampler(config, DATA)
    assert isinstance(sampler, AbstractCurriculumSampler)
    assert sampler.config is config and list(sampler)[:3] == [0, 1, 2]
    sampler.update({"index": [0, 1, 2], "score": [1.0, 1.0, 1.0]})
    assert list(sampler)[:3] == [3, 4, 5] and list(sampler)[-3:] == [0, 1, 2]


def test_curriculum_sampler_config_errors(plugin):
    with pytest.raises(ValueError, match="data.dataloader_num_workers=0"):
        create_rl_sampler({
            "sampler": {
                "class_path": plugin,
                "class_name": "HardFirst"
            },
            "dataloader_num_workers": 2
        }, DATA)
    with pytest.raises(TypeError, match="AbstractSampler"):
        create_rl_sampler({"sampler": {"class_path": plugin, "class_name": "NotASampler"}}, DATA)
    with pytest.raises(AttributeError, match=r"data.sampler.class_name 'Missing' .*HardFirst"):
        create_rl_sampler({"sampler": {"class_path": plugin, "class_name": "Missing"}}, DATA)
    with pytest.raises(ValueError, match="data.sampler.class_name is empty"):
        create_rl_sampler({"sampler": {"class_path": plugin, "class_name": None}}, DATA)
    with pytest.raises(FileNotFoundError, match="nope.py"):
        create_rl_sampler({"sampler": {"class_path": "/does/not/exist/nope.py", "class_name": "X"}}, DATA)


def test_load_object_from_module_and_pkg():
    import json

    assert load_object("pkg://json", "dumps", "k.path", "k.name") is json.dumps
    assert load_object("json", "loads", "k.path", "k.name") is json.loads
    with pytest.raises(ImportError, match="k.path"):
        load_object("no_such_module_xyz", "x", "k.path", "k.name")


def test_get_dataset_class(plugin):
    assert get_dataset_class({}) is RLHFDataset
    assert get_dataset_class({"custom_cls": {"path": None, "name": None}}) is RLHFDataset
    cls = get_dataset_class({"custom_cls": {"path": plugin, "name": "MyDataset"}})
    assert issubclass(cls, Dataset) and cls.__name__ == "MyDataset"
    with pytest.raises(TypeError, match="data.custom_cls.name"):
        get_dataset_class({"custom_cls": {"path": plugin, "name": "NotASampler"}})
