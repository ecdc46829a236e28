"""``edgedistill simulate``: a simulated edge fleet on the Flower Simulation Engine (Ray).

Flower's supported path, the one ``flwr run .`` takes: :class:`SimulationLink` starts a SuperLink
in simulation mode on a free loopback port and the SuperExec that runs its ServerApps (state, logs
and CLI config under ``OUT/.flwr``), and ``flwr run`` submits this project's ServerApp and
ClientApp to it with the run config written from a :class:`FederationConfig` and N virtual
SuperNodes. The ServerApp runs in the SuperLink's
``flwr-simulation`` process; its output is streamed here. Flower is configured for machines
without internet (no telemetry, no update check, no runtime dependency installation). The
SuperLink and everything it started stop when the run ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from common.errors import EdgeDistillError
from common.report import markdown_table
from common.runtime import die_with_parent

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "edgedistill-sim"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # CPU-only actors: Ray leaves CUDA_VISIBLE_DEVICES alone
}
LINK_START_TIMEOUT = 60.0


def flower_environment(out_dir: Path) -> dict[str, str]:
    return {**FLOWER_ENV, "FLWR_HOME": str((out_dir / ".flwr").resolve())}


def flower_tool(name: str) -> str:
    """The path of a Flower console script installed next to this Python."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise EdgeDistillError(f'{name} is not installed next to {sys.executable}: pip install -e ".[simulation]"')
    return str(path)


def free_ports(count: int = 1) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class SimulationLink:
    """A SuperLink in simulation mode on 127.0.0.1 and the SuperExec that runs its ServerApps.

    Both are children of this process, in its process group (Flower's own subprocess isolation
    would start the SuperExec in a session of its own, out of reach of Ctrl-C and of a kill of the
    job), so the ``flwr-simulation`` process and Ray's workers share the job's fate. ``home``
    (``FLWR_HOME``) gets ``config.toml`` naming the connection :data:`CONNECTION`, the SuperLink's
    database and its log. Leaving the ``with`` block stops both; on Linux they also die with this
    process.
    """

    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.env = home, env
        (self.port,) = free_ports(1)
        self.log = home / "superlink.log"
        self.processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SimulationLink:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\ninsecure = true\n'
        )
        link = [
            flower_tool("flower-superlink"),
            *("--insecure", "--simulation", "--isolation", "process"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--database", str(self.home / "superlink.db")),
            "--disable-runtime-dependency-installation",
            *("--log-file", str(self.log)),
        ]
        superexec = [
            flower_tool("flower-superexec"),
            *("--insecure", "--runtime-api-address", self.address, "--parent-pid", str(os.getpid())),
        ]
        try:
            self._start(link, subprocess.DEVNULL)
            self._wait_ready()
            with (self.home / "superexec.log").open("ab") as log:
                self._start(superexec, log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, command: list[str], log) -> None:
        self.processes.append(
            subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        )

    def _wait_ready(self) -> None:
        import httpx

        link = self.processes[0]
        deadline = time.monotonic() + LINK_START_TIMEOUT
        while time.monotonic() < deadline:
            if link.poll() is not None:
                raise EdgeDistillError(f"the simulation SuperLink exited at start; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.address}/health", timeout=1.0).is_success:
                    return
            time.sleep(0.2)
        raise EdgeDistillError(
            f"the simulation SuperLink did not start within {LINK_START_TIMEOUT:.0f} s; see {self.log}"
        )

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):  # the SuperExec first, then the SuperLink
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def simulate_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--clients", type=int, default=4, help="number of simulated edge devices")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "shards"])
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--shards-per-client", type=int, default=2)
    parser.add_argument("--pipc", default="50", help="public images per class kept on the server ('all': none)")
    parser.add_argument("--model", default="convnet3")
    parser.add_argument(
        "--strategy",
        default="fedavg",
        help="fedavg | fedprox | krum | multikrum | bulyan | fedmedian | fedtrimmedavg (README: Hostile devices)",
    )
    parser.add_argument("--proximal-mu", type=float, default=0.01)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--max-update-norm", type=float, default=1e3)
    parser.add_argument("--min-valid-replies", type=int, default=1)
    parser.add_argument("--max-failed-rounds", type=int, default=3, help="rounds in a row without a new model")
    parser.add_argument("--weighting", default="capped", choices=["capped", "uniform", "claimed"])
    parser.add_argument("--max-examples", type=int, default=0, help="cap of --weighting capped (0: median claim)")
    parser.add_argument("--norm-bound", type=float, default=3.0, help="x the round's median update norm (0: off)")
    parser.add_argument("--norm-clip", action="store_true", help="clip updates past a bound instead of dropping")
    parser.add_argument("--byzantine-fraction", type=float, default=0.2)
    parser.add_argument("--distill-every", type=int, default=0, help="server distillation round every K rounds")
    parser.add_argument("--distill", default="", metavar="METHOD", help="distill in server rounds (e.g. dm+dkkt)")
    parser.add_argument("--ipc", default="10", help="synthetic images per class of the server rounds")
    parser.add_argument("--iterations", type=int, default=1000, help="iteration budget of a server round's method")
    parser.add_argument("--distill-time-limit", type=float, default=3600.0, help="seconds per server round")
    parser.add_argument(
        "--distill-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the --distill method, e.g. w_kkt=100 (repeatable)",
    )
    parser.add_argument(
        "--distill-allocation",
        default="fixed",
        choices=["fixed", "adaptive", "federated"],
        help="per-class counts of server rounds: fixed ipc, adaptive (K-means on the public subset), "
        "federated (K-means statistics from the devices)",
    )
    parser.add_argument(
        "--compare",
        default="random,herding,dm,dsv,dm+dkkt",
        help="methods run once after the last round on the same ipc/pipc for the summary table ('' for none)",
    )
    parser.add_argument("--eval-runs", type=int, default=2, help="evaluation runs per distilled set")
    parser.add_argument("--eval-epochs", type=int, default=300, help="epochs per evaluation run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/simulation")
    parser.add_argument("--resume", action="store_true", help="continue from the last round's checkpoint")
    parser.add_argument(
        "--resume-allow-changes", action="store_true", help="resume although settings that alter the result changed"
    )
    parser.add_argument("--cpus-per-client", type=float, default=1.0)


def config_from_args(args: argparse.Namespace):
    from server.federation.run import FederationConfig

    return FederationConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        num_rounds=args.rounds,
        strategy=args.strategy,
        proximal_mu=args.proximal_mu,
        fraction_train=args.fraction_train,
        min_train_nodes=args.clients if args.fraction_train >= 1 else 1,
        min_available_nodes=args.clients,
        min_valid_replies=args.min_valid_replies,
        max_failed_rounds=args.max_failed_rounds,
        max_update_norm=args.max_update_norm,
        weighting=args.weighting,
        max_examples=args.max_examples,
        norm_bound=args.norm_bound,
        norm_clip=args.norm_clip,
        byzantine_fraction=args.byzantine_fraction,
        partition=args.partition,
        alpha=args.alpha,
        shards_per_client=args.shards_per_client,
        pipc=str(args.pipc),
        seed=args.seed,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        out_dir=args.out,
        resume=args.resume,
        resume_allow_changes=args.resume_allow_changes,
        distill_every=args.distill_every,
        distill_method=args.distill,
        distill_ipc=str(args.ipc),
        distill_iterations=args.iterations,
        distill_time_limit=args.distill_time_limit,
        distill_options=",".join(args.distill_option),
        distill_eval_runs=args.eval_runs,
        distill_eval_epochs=args.eval_epochs,
        distill_allocation=args.distill_allocation,
    )


def absolute_paths(config):
    """The config with its paths absolute: the ServerApp runs in another process and directory."""
    dataset = config.dataset
    for scheme in ("npz:", "imagefolder:"):
        if dataset.startswith(scheme):
            dataset = scheme + str(Path(dataset[len(scheme) :]).expanduser().resolve())
    data_root = str(Path(config.data_root).expanduser().resolve()) if config.data_root else ""
    return replace(config, dataset=dataset, data_root=data_root, out_dir=str(Path(config.out_dir).resolve()))


def run_simulated_fleet(config, clients: int, cpus_per_client: float = 1.0, echo=print) -> list[dict]:
    """Run the federation on ``clients`` virtual SuperNodes; returns the per-round history.

    ``cpus_per_client`` may be a fraction (0.5: two devices train at once per core).

    ``echo`` gets every line the run prints (the ServerApp's round lines, Flower's log).
    """
    import tomli_w

    from common.fileio import atomic_write_bytes
    from server.federation.run import load_history

    if cpus_per_client <= 0:
        raise EdgeDistillError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    config = absolute_paths(config)
    out = Path(config.out_dir)
    env = {**os.environ, **flower_environment(out)}
    home = Path(env["FLWR_HOME"])
    run_config = home / "run-config.toml"
    atomic_write_bytes(run_config, tomli_w.dumps(config.to_run_config()).encode())  # makes OUT/.flwr
    # Flower takes whole CPUs per virtual device: a fraction is had by giving Ray more logical CPUs
    logical_cpus = max(1, round((os.cpu_count() or 1) / cpus_per_client))
    federation = (
        f"num-supernodes={clients} client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={logical_cpus}"
    )
    command = [flower_tool("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--run-config", str(run_config)]
    command += ["--federation-config", federation, "--stream"]
    with (
        SimulationLink(home, env),
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as run,
    ):
        for line in run.stdout:
            echo(line.rstrip("\n"))
    return load_history(out) if (out / "metrics.json").exists() else []


def simulate_main(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EdgeDistillError('the simulation engine needs Ray: pip install -e ".[simulation]"') from None
    from server.federation.run import check_resume

    config = config_from_args(args)
    check_resume(config)  # a refused resume fails here, in one line, before any device starts
    history = run_simulated_fleet(config, args.clients, args.cpus_per_client)
    if not history or history[-1]["round"] != config.num_rounds:
        raise EdgeDistillError(
            f"the federation stopped early; see the log above and {args.out}/.flwr/superlink.log "
            f"(resume with --resume, out {args.out})"
        )
    rows = [
        (
            h["round"],
            f"{100 * h['accuracy']:.2f}",
            f"{h['loss']:.4f}",
            h.get("clients_ok", "-"),
            h.get("clients_dropped", "-"),
        )
        for h in history
    ]
    print("\n" + markdown_table(["round", "global acc %", "loss", "clients ok", "dropped"], rows))
    print(f"\nwrote {args.out}/metrics.json, accuracy.png, global-model/ ({config.dataset})")
    if config.distill_method:
        compare = [m for m in args.compare.split(",") if m.strip()]
        summary = compare_methods(config, history, compare)
        print("\n" + summary)
    return 0


def compare_methods(config, history: list[dict], methods: list[str]) -> str:
    """Distill with each method once from the final global model; the summary table (markdown)."""
    from common.artifacts import load_distilled_set
    from common.datasets import load_dataset
    from common.fileio import atomic_write_bytes, atomic_write_json
    from common.report import format_accuracy
    from common.visualize import save_spectra
    from server.federation.rounds import distill_and_evaluate
    from server.federation.run import GLOBAL_MODEL_DIR

    out = Path(config.out_dir)
    final = history[-1]
    plan = config.round_plan()
    if plan.allocation == "federated" and "distill_counts" in final:
        # the devices' statistics are gone after the run: compare on the counts the last round used
        counts = ",".join(f"{c}:{n}" for c, n in final["distill_counts"].items())
        plan = replace(plan, ipc=counts, allocation="fixed")
    data = load_dataset(config.dataset, data_root=config.data_root or None)
    rows = [(f"global model (FedAvg, {final['round']} rounds)", "-", f"{100 * final['accuracy']:.2f}", "-")]
    results = []
    for method in dict.fromkeys([*methods, config.distill_method]):
        if method == config.distill_method and "distilled_accuracy" in final:
            result = {
                "method": method,
                "accuracy": final["distilled_accuracy"],
                "accuracy_std": final["distilled_accuracy_std"],
                "distill_seconds": final["distill_seconds"],
                "artifact": final["distilled_artifact"],
            }
        else:
            print(f"comparison: {method} (ipc {plan.ipc}, pipc {plan.pipc}) ...", flush=True)
            options = plan.options if method == plan.method else {}
            result = distill_and_evaluate(
                data,
                replace(plan, method=method, options=options),
                out / "compare" / method,
                global_model=out / GLOBAL_MODEL_DIR,
                labels={"round": final["round"], "comparison": True},
            )
        results.append(result)
        label = f"{method} (server round)" if method == config.distill_method else method
        rows.append(
            (
                label,
                plan.ipc,
                format_accuracy(result["accuracy"], result["accuracy_std"]),
                f"{result['distill_seconds']:.1f}",
            )
        )
    table = markdown_table(["", "ipc", "test accuracy %", "distill s"], rows)
    text = (
        f"{config.dataset}: {final['round']} rounds, pipc {plan.pipc}, {plan.iterations} iterations per method, "
        f"evaluation {plan.eval_runs} x ConvNet-3 {plan.eval_epochs} epochs\n\n{table}\n"
    )
    spectra = {r["method"]: load_distilled_set(r["artifact"]).images for r in results if r["method"] != "random"}
    if spectra:
        save_spectra(spectra, out / "spectra.png")
    atomic_write_json(out / "summary.json", {"global_model": final, "methods": results})
    atomic_write_bytes(out / "summary.md", text.encode())
    return text
