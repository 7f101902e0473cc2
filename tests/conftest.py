"""Shared test fixtures. Tests run on CPU, offline, with the real tokenizer and real data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    """The golden values of the original M3AE implementation (see tests/fixtures/README.md)."""
    with np.load(FIXTURES / "m3ae_reference_tiny.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def clipart_shards(tmp_path_factory) -> list[str]:
    """Real shards written by `m3ae shards` from openclipart: ~96 drawings at 64 px, 4 shards."""
    from pipelines.shard_records import openclipart_records
    from pipelines.shard_writer import write_shards

    out = tmp_path_factory.mktemp("clipart")
    records = openclipart_records(size=64, limit=96, shuffle_seed=0, workers=2)
    summary = write_shards(records, out, samples_per_shard=24, progress=False)
    assert summary["written"] >= 90, summary
    return sorted(str(p) for p in out.glob("*.tar"))


@pytest.fixture(scope="session")
def cli_without():
    """`run(module, argv)`: `m3ae ARGV` in a fresh interpreter where importing `module` fails
    for real (as without its optional extra); returns (exit code, stderr lines)."""
    import subprocess
    import sys

    def run(module: str, argv: list[str]) -> tuple[int, list[str]]:
        code = (
            f"import sys; sys.modules[{module!r}] = None\n"
            "from m3ae.cli import main\n"
            f"sys.exit(main({list(argv)!r}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        return done.returncode, done.stderr.strip().splitlines()

    return run


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """`s3://m3ae-test-<random>` on a moto server at 127.0.0.1:<free port>, one per test module
    that asks, with the AWS variables set for this process and the processes it starts (a Ray
    cluster started after it included); everything restored afterwards. The bucket is new each
    time: moto keeps its buckets in this process across servers."""
    import logging
    import socket
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    from pipelines import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    os.environ.update(env)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(key, None)
    s3fs.S3FileSystem.clear_instance_cache()  # none built for another endpoint
    try:
        bucket = f"m3ae-test-{uuid.uuid4().hex[:12]}"
        storage.filesystem(f"s3://{bucket}").mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- Markers ----------------------------------------------------------------------------------
# Markers are given here, not in the test files. A key is a test function's name (all its
# parameters), a test's full name with one parameter set (`name[id]`), or a file name (all of
# its tests); by name, a marker follows a test that moves to another file.
# tests/test_floor_plan.py checks that every key still names a test. `make test-fast` runs
# `-m "not slow and not ray and not multiprocess"`, about 2 minutes; `make test` runs everything.
#   slow          trains, runs a notebook, or takes more than ~3 s on 2 busy cores (mostly XLA
#                 compiles of a model, or a module fixture that builds and saves one)
#   ray           starts a Ray instance (start_local_ray, m3ae launch, ray job submit)
#   multiprocess  starts further Python/JAX processes of ours: the CLI or a fresh interpreter in
#                 a subprocess, several JAX hosts, a notebook kernel. (The openclipart renderer's
#                 process pool inside the clipart_shards fixture is the pipeline's own.)
SLOW, RAY, MULTIPROCESS = "slow", "ray", "multiprocess"
MARKERS: dict[str, tuple[str, ...]] = {
    # --- whole files
    # An embedded Ray, a two-host JAX job over jax.distributed, `ray job submit`, a lost host.
    "test_launch.py": (SLOW, RAY, MULTIPROCESS),
    # A multi-node Ray on 127.0.0.1 whose nodes are killed, frozen or told to stop under a job.
    "test_cluster_faults.py": (SLOW, RAY, MULTIPROCESS),
    # A `ray start --head` cluster with token auth; clients in fresh interpreters.
    "test_cluster_auth.py": (SLOW, RAY, MULTIPROCESS),
    # The LM recipes train for tens of steps and resume; lm-eval and generate on the result.
    "test_lm_train.py": (SLOW,),
    # The wheel built by pip and installed in a fresh venv; a 2-step train from it.
    "test_packaging.py": (SLOW, MULTIPROCESS),
    # The LM decoded against its KV cache in reduced precision (two more compiles each).
    "test_decoding_in_reduced_precision": (SLOW,),
    # `m3ae serve` in a subprocess with its own Ray and Serve, spoken to over HTTP.
    "test_vectors_equal_m3ae_embed": (SLOW, RAY, MULTIPROCESS),
    "test_model_card_health_and_auth": (SLOW, RAY, MULTIPROCESS),
    "test_concurrent_requests_share_forwards": (SLOW, RAY, MULTIPROCESS),
    "test_every_limit_answers_4xx_and_the_replica_lives_on": (SLOW, RAY, MULTIPROCESS),
    "test_sigterm_stops_the_server_and_its_ray": (SLOW, RAY, MULTIPROCESS),
    # TensorFlow (the tf extra) imported, three jax2tf exports loaded back and run.
    "test_savedmodel.py": (SLOW,),
    # TensorFlow imported (~5 s once): TFRecords it wrote, Example bytes, ours read by tf.data.
    "test_reads_files_tensorflow_wrote": (SLOW,),
    "test_example_bytes_are_interchangeable": (SLOW,),
    "test_tensorflow_reads_our_files": (SLOW,),
    # TFDS datasets prepared offline; `m3ae probe` on one in a subprocess; one-line errors.
    "test_tfds.py": (SLOW,),
    "test_probe_cli_reads_the_prepared_files_alone": (SLOW, MULTIPROCESS),
    "test_errors_are_one_line": (SLOW, MULTIPROCESS),
    # Fine-tuning runs on real digits: 150 steps, resume, a pretrained encoder.
    "test_finetune.py": (SLOW,),
    # --- slow: training for many steps
    "test_train_local_recipe_runs": (SLOW,),
    "test_train_with_unpaired_streams": (SLOW,),
    "test_tfrecord_shards_train_exactly_as_tars": (SLOW,),
    "test_gradient_accumulation_trains": (SLOW,),
    "test_resume_is_bitwise_identical": (SLOW,),
    "test_nonfinite_guard": (SLOW,),
    "test_config_has_a_pulse": (SLOW,),
    "test_the_mae_recipe_trains_image_only": (SLOW,),
    "test_probe_hook_in_training": (SLOW,),
    "test_overfit_one_real_batch": (SLOW,),
    "test_overfit_one_batch_of_shakespeare_then_regenerate": (SLOW,),
    # Training in fresh processes: four XLA devices; a kill during a save.
    "test_four_device_data_fsdp_matches_one_device": (SLOW, MULTIPROCESS),
    # Fresh interpreters: the CPU client's dispatch mode is fixed when JAX starts.
    "test_scratch_is_reused_between_calls": (MULTIPROCESS,),
    "test_kill_during_save_leaves_a_loadable_checkpoint": (SLOW, MULTIPROCESS),
    # Preemption: SIGTERM to `m3ae train`, then the rerun and a reference run; SIGTERM to one
    # host of a two-process jax.distributed job; request() from another thread (in process);
    # request() on one of two jax.distributed processes (no training: a few seconds).
    "test_sigterm_stops_train_and_the_rerun_resumes_bitwise": (SLOW, MULTIPROCESS),
    "test_sigterm_to_one_host_stops_both_at_the_same_step": (SLOW, MULTIPROCESS),
    "test_request_from_another_thread_stops_with_a_checkpoint": (SLOW,),
    "test_request_on_one_host_stops_both_at_the_same_step": (MULTIPROCESS,),
    # A workdir and shards on the S3 server (the `s3` fixture above): train, kill, resume;
    # Orbax saves to that server (about 3 s each).
    "test_killed_run_on_s3_resumes_bitwise_identical": (SLOW, MULTIPROCESS),
    "test_damaged_s3_checkpoint_falls_back_and_is_moved_aside": (SLOW,),
    # Notebooks executed in a Jupyter kernel.
    "test_transfer_notebook_shows_the_committed_result": (SLOW, MULTIPROCESS),
    "test_quickstart_notebook_executes": (SLOW, MULTIPROCESS),
    # Ray actors (tests that request the `local_ray` fixture are marked below).
    "test_ray_actor_pool_matches_plain_loop": (RAY,),
    # Waits out a 2 s placement timeout, then starts a pool that fits.
    "test_a_pool_the_cluster_cannot_place_fails_in_seconds_naming_free_resources": (SLOW,),
    # `python -m m3ae.cli ...` or `python -c ...` in a subprocess.
    "test_train_cli_names_a_mistyped_key": (MULTIPROCESS,),
    "test_batches_split_over_three_devices": (SLOW, MULTIPROCESS),
    "test_batch_size_zero_via_the_command": (MULTIPROCESS,),
    "test_mistyped_shard_paths_fail_at_once_in_one_line": (MULTIPROCESS,),
    "test_config_mistakes_name_the_key_and_value": (MULTIPROCESS,),
    "test_a_stream_with_no_usable_sample_stops_naming_shards_and_reasons": (MULTIPROCESS,),
    "test_import_reference_pickle_via_cli": (MULTIPROCESS,),
    "test_import_reference_npz_reproduces_golden_outputs": (MULTIPROCESS,),
    "test_import_reference_refuses_unrelated_files": (MULTIPROCESS,),
    "test_same_shards_same_files_across_processes": (MULTIPROCESS,),
    "test_malicious_pickles_run_nothing": (MULTIPROCESS,),
    # What a fresh interpreter imports (the floor plan at run time).
    "test_package_exports_load_lazily": (MULTIPROCESS,),
    "test_the_encode_path_and_the_user_api_import_no_model": (MULTIPROCESS,),
    "test_model_dir_and_lm_directories_import_no_model_family": (MULTIPROCESS,),
    # --- slow: XLA compiles of the M3AE model, or module fixtures that build a model directory
    # (test_api `tiny`, test_embed `model_dir`, test_encode `model_dir`, test_pictures
    # `reconstructed`, test_crossmodal `trained`, test_probe_cli `first_run`).
    "test_directory_holds_preprocess_and_tokenizer": (SLOW,),
    "test_features_equal_the_flax_module_and_survive_a_round_trip": (SLOW,),
    "test_image_inputs_agree": (SLOW,),
    "test_normalize_gives_unit_norm": (SLOW,),
    "test_text_strings_equal_ids_of_the_bundled_tokenizer": (SLOW,),
    "test_cls_and_mean_pooling": (SLOW,),
    "test_reconstruct": (SLOW,),
    "test_directories_of_the_old_format_still_load": (SLOW,),
    "test_clear_errors": (SLOW,),  # test_api (`tiny`) and test_encode (`model_dir`)
    "test_crossmodal_gain_tells_a_model_that_sees_from_one_that_cannot": (SLOW,),
    "test_zeroshot_caption_scores_pick_the_picture_s_colour": (SLOW,),
    "test_crossmodal_is_deterministic": (SLOW,),
    "test_masked_only_heads_give_the_full_heads_losses_and_gradients": (SLOW,),
    "test_all_token_losses_with_masked_only_heads": (SLOW,),
    "test_unpaired_text_loss_weight": (SLOW,),
    "test_the_mae_never_builds_text_parameters": (SLOW,),
    "test_layout_rows_and_alignment": (SLOW,),
    "test_metadata_has_clip_retrieval_columns": (SLOW,),
    "test_float32_mean_pool_without_normalisation": (SLOW,),
    "test_resume_recomputes_only_missing_partitions": (SLOW,),
    "test_folder_and_file_list_skip_corrupt_images": (SLOW,),
    "test_missing_shard_is_not_finished_and_a_rerun_embeds_it": (SLOW,),
    "test_truncated_shard_keeps_its_rows_but_is_recomputed": (SLOW,),
    "test_folder_without_captions_embeds_images_alone": (SLOW,),
    "test_api_embed_and_probe_hook_give_identical_features": (SLOW,),
    "test_batches_are_padded_and_sliced_back": (SLOW,),
    "test_probe_hook_on_a_data_by_fsdp_mesh_matches_the_api": (SLOW,),
    "test_analytic_flops_match_xla": (SLOW,),
    "test_unmasked_representations": (SLOW,),
    "test_gradients": (SLOW,),
    "test_model_default_masks_are_per_example_and_parity_option_per_batch": (SLOW,),
    "test_image_only_and_text_only_batches": (SLOW,),
    "test_scan_equals_unrolled": (SLOW,),
    "test_bfloat16_close_to_float32": (SLOW,),
    "test_encode_pooling_and_padding": (SLOW,),
    "test_reconstruct_pastes_visible_patches": (SLOW,),
    "test_save_pictures_passes_captions": (SLOW,),
    "test_preset_parameter_counts[large-376155194]": (SLOW,),
    "test_preset_parameter_counts[huge-711666746]": (SLOW,),
    "test_grid_with_captions": (SLOW,),
    "test_grid_image_only": (SLOW,),
    "test_save_load_roundtrip_into_either_layout": (SLOW,),
    "test_cli_writes_clip_benchmark_json_and_png": (SLOW,),
    "test_second_run_reuses_features": (SLOW,),
    "test_npy_dataset_gives_the_same_probe": (SLOW,),
    "test_named_dataset_fewshot_and_random_init": (SLOW,),
    "test_class_folder_tree_split_by_key": (SLOW,),
    "test_trained_on_shards_are_excluded": (SLOW,),
    "test_explicit_exclusion_lists": (SLOW,),
    "test_bad_dataset_and_option_name_the_option": (SLOW,),
    # --- slow: the classifier and the stacks with drop path compiled several times
    "test_classifier_features_are_the_m3ae_encoder_s": (SLOW,),
    "test_drop_path_on_changes_outputs_and_is_deterministic_per_key": (SLOW,),
    "test_classifier_loss_smoothing_and_mixing": (SLOW,),
    # --- slow: the causal LM compiled per attention path and position kind
    "test_causality_with_fcm_on": (SLOW,),
    "test_fcm_off_is_bit_identical_to_plain_causal": (SLOW,),
    "test_every_attention_path_honours_the_fcm_mask": (SLOW,),
    "test_scanned_and_unrolled_agree_under_fcm": (SLOW,),
    "test_packed_documents_equal_documents_alone": (SLOW,),
    "test_rotary_depends_on_relative_positions_only": (SLOW,),
    "test_tfcm_layout_in_the_model": (SLOW,),
    "test_fcm_off_is_the_plain_causal_mask": (SLOW,),
    # --- slow: probes fitted by gradient descent (linear, logistic) on digits
    "test_separated_blobs_are_solved[linear]": (SLOW,),
    "test_separated_blobs_are_solved[logistic]": (SLOW,),
    "test_random_labels_give_chance[linear]": (SLOW,),
    "test_random_labels_give_chance[logistic]": (SLOW,),
    "test_logistic_matches_sklearn_on_digits": (SLOW,),
    "test_linear_and_ridge_on_digits": (SLOW,),
    "test_linear_default_lr_is_swept_and_convergence_reported": (SLOW,),
    "test_logistic_reports_an_unconverged_fit": (SLOW,),
    # --- slow: rendering or scanning the whole openclipart collection (module fixtures)
    "test_openclipart_layout": (SLOW,),
    "test_openclipart_stats_add_up": (SLOW,),
    "test_openclipart_webdataset_reads_it": (SLOW,),
    "test_openclipart_deterministic": (SLOW,),
    "test_openclipart_render_ignores_earlier_files": (SLOW,),
    "test_openclipart_order_and_duplicates": (SLOW,),
    "test_scan_finds_whole_collection": (SLOW,),
    "test_scan_captions_are_clean": (SLOW,),
    "test_render_real_svgs": (SLOW,),
    "test_iter_openclipart_keeps_order_and_reports_failures": (SLOW,),
}
# Fixtures that start Ray: a test requesting one is marked `ray` wherever it lives.
RAY_FIXTURES = {"local_ray", "no_ray_left"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        keys = (item.path.name, getattr(item, "originalname", item.name), item.name)
        marks = {mark for key in keys for mark in MARKERS.get(key, ())}
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            marks.add(RAY)
        for mark in sorted(marks):
            item.add_marker(mark)
