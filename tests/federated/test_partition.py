"""federated.partition: each split's shares, their order, and the refusals that name the fix;
the federated: section's own checks."""

import json

import pytest

from loratune.config import ConfigError, build_config
from loratune.federated.partition import PartitionError, split, write_partitions

RECORDS = [{"text": f"r{i}", "lang": "en" if i % 3 else "zh", "task": f"t{i % 4}"}
           for i in range(60)]


def test_iid_covers_every_record_once_in_file_order():
    parts = split(RECORDS, "iid", 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(60))
    assert all(p == sorted(p) and len(p) == 15 for p in parts)
    assert parts != split(RECORDS, "iid", 4, seed=2) and parts == split(RECORDS, "iid", 4, 1)
    assert split(RECORDS, "iid", 1, seed=1) == [list(range(60))]  # one client: the whole file


def test_column_gives_each_value_to_one_client():
    parts = split(RECORDS, "column:lang", 2, seed=0)
    assert [{RECORDS[i]["lang"] for i in p} for p in parts] == [{"en"}, {"zh"}]
    with pytest.raises(PartitionError, match="column:lang: 2 distinct values .* for 3 clients"):
        split(RECORDS, "column:lang", 3, seed=0)
    with pytest.raises(PartitionError, match="record 0 has no 'language' field"):
        split(RECORDS, "column:language", 2, seed=0)


def test_dirichlet_small_alpha_is_unequal_and_seeded():
    skewed = [len(p) for p in split(RECORDS * 5, "dirichlet:0.5", 4, seed=1)]
    even = [len(p) for p in split(RECORDS * 5, "dirichlet:1000", 4, seed=3)]
    assert sum(skewed) == sum(even) == 300
    assert max(skewed) - min(skewed) > 60 and max(even) - min(even) < 20
    by_task = split(RECORDS * 5, "dirichlet:0.5:task", 3, seed=3)
    assert sorted(i for p in by_task for i in p) == list(range(300))
    with pytest.raises(PartitionError, match="client .* gets no records"):
        split(RECORDS[:3], "dirichlet:0.01", 3, seed=0)


def test_write_partitions_writes_one_jsonl_per_client(tmp_path):
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths = write_partitions(src, "column:lang", 2, 0, tmp_path / "clients")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "clients/client-0/train.jsonl", "clients/client-1/train.jsonl"]
    rows = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert len(rows) == 20 and {r["lang"] for r in rows} == {"zh"}


@pytest.mark.parametrize("federated,said", [
    ({"partition": "random"}, "expected iid, column:<name>"),
    ({"partition": "dirichlet:0"}, "alpha must be > 0"),
    ({"local_epochs": 1.0}, "give local_steps or local_epochs"),
    ({"clients_per_round": 1.5}, "as a fraction must be at most 1.0"),
    ({"clients": 2, "client_data": ["a.jsonl"]}, "1 files for 2 clients"),
    ({"clients": 4, "clients_per_round": 0.5, "min_clients": 3}, "min_clients: 3 is more than"),
])
def test_the_federated_section_names_a_bad_setting(federated, said):
    with pytest.raises(ConfigError, match=said):
        build_config({"federated": federated})


def test_clients_per_round_is_a_fraction_or_a_count():
    assert build_config({"federated": {"clients": 10, "clients_per_round": 0.3}}
                        ).federated.per_round() == 3
    assert build_config({"federated": {"clients": 10, "clients_per_round": 4}}
                        ).federated.per_round() == 4


def test_federate_refuses_what_it_cannot_do_by_field():
    from loratune.recipes.federate import check_federated

    for data, said in [({"adapter": {"method": "ia3"}, "federated": {"aggregation": "svd"}},
                        "svd works on LoRA's A and B"),
                       ({"train": {"objective": "dpo"}, "federated": {}}, "train.objective: dpo"),
                       ({"adapter": {"init_lora_weights": "pissa"}, "federated": {}}, "pissa"),
                       ({}, "needs a federated: section")]:
        with pytest.raises(ConfigError, match=said):
            check_federated(build_config(data))


def test_the_command_line_names_a_missing_section(tmp_path, capsys):
    from loratune.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")
    assert main(["federate", str(config)]) == 2
    assert "loratune federate: error: loratune federate needs a federated: section" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_local_epochs_count_steps_on_the_clients_own_batches():
    from types import SimpleNamespace

    from loratune.federated.client import steps_per_round

    cfg = build_config({"train": {"grad_accum": 2},
                        "federated": {"local_steps": None, "local_epochs": 1.5}})
    assert steps_per_round(cfg, SimpleNamespace(n_batches=7)) == 5  # ceil(1.5 * 7 // 2)
    cfg = build_config({"federated": {"local_steps": 3}})
    assert steps_per_round(cfg, SimpleNamespace(n_batches=7)) == 3
