//! Fedmesh's developer commands.
//!
//! `cargo xtask demo` sets up whatever this machine lacks and runs the main job;
//! `cargo xtask test` sets up and runs every check CI runs. Setup is idempotent: each step
//! looks before it installs, so a second run costs seconds.
//!
//! What setup owns:
//! - the Debian packages the build and the tests need (installed with apt-get when missing);
//! - the project venv (`.venv`, or `FEDMESH_VENV`) holding the PyPI torch wheel, whose libtorch
//!   the `tch` crate links against, and the Python reference scripts' needs;
//! - the environment every cargo and binary invocation gets: `LIBTORCH_USE_PYTORCH`, the
//!   venv on `PATH`, and libtorch's directory on `LD_LIBRARY_PATH`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// The torch wheel whose libtorch `tch` 0.26 expects.
const TORCH_REQUIREMENT: &str = "torch==2.13.0";

/// Python packages the reference scripts need beside torch.
const PYTHON_REQUIREMENTS: &[&str] = &["numpy"];

/// Features that compile in what only the tests use: the store agent's crash-injection
/// points, and core's etcd registry backend with its three-node cluster test.
const TEST_FEATURES: &str = "fedmesh-store-agent/failpoints,fedmesh-core-agg/etcd";

/// Debian packages the build and the tests need.
/// `fonts-dejavu-core` holds the TTF the lab's plots draw their text with.
const APT_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "fonts-dejavu-core",
];

/// The main job: the Dominick's federation that `cargo xtask demo` runs.
const MAIN_SCENARIO: &str = "netlab/scenarios/dominicks-oj.toml";

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup            install what is missing (Debian packages, the torch venv)
  demo [args]      set up, then run the main job (extra args go to `netlab run`)
  test             set up, then run formatting, lints and every test
  bench [name]     set up, then run the benchmarks (all, or those of one crate)
  env              print the environment that built binaries need, as shell exports";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let root = workspace_root()?;

    match command.as_str() {
        "setup" => setup(&root).map(|_| ()),
        "demo" => {
            let env = setup(&root)?;
            demo(&root, &env, &rest)
        }
        "test" => {
            let env = setup(&root)?;
            test(&root, &env)
        }
        "bench" => {
            let env = setup(&root)?;
            bench(&root, &env, &rest)
        }
        "env" => {
            let env = BuildEnv::discover(&root)?;
            for (key, value) in env.vars() {
                println!("export {key}={:?}", value.to_string_lossy());
            }
            Ok(())
        }
        "" | "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = env::var_os("CARGO_MANIFEST_DIR").context("run me through `cargo xtask`")?;
    let root = Path::new(&manifest)
        .parent()
        .context("xtask's manifest has no parent directory")?;
    Ok(root.to_path_buf())
}

/// The environment that builds and runs against the venv's libtorch.
#[derive(Clone)]
struct BuildEnv {
    venv: PathBuf,
    torch_lib: PathBuf,
    /// Variables a command adds for its own children.
    extra: Vec<(&'static str, OsString)>,
}

impl BuildEnv {
    fn discover(root: &Path) -> Result<Self> {
        let venv = venv_dir(root);
        let python = venv.join("bin/python");
        let out = Command::new(&python)
            .args([
                "-c",
                "import os, torch; print(os.path.dirname(torch.__file__))",
            ])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        if !out.status.success() {
            bail!(
                "torch is not importable from {}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let torch_dir = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        Ok(Self {
            venv,
            torch_lib: torch_dir.join("lib"),
            extra: Vec::new(),
        })
    }

    fn vars(&self) -> Vec<(&'static str, OsString)> {
        let path = prepend(&self.venv.join("bin"), env::var_os("PATH"));
        let ld = prepend(&self.torch_lib, env::var_os("LD_LIBRARY_PATH"));
        let mut vars = vec![
            ("VIRTUAL_ENV", self.venv.clone().into_os_string()),
            ("PATH", path),
            ("LIBTORCH_USE_PYTORCH", "1".into()),
            ("LD_LIBRARY_PATH", ld),
            // One libtorch thread per process unless the caller chose otherwise: the default
            // oversubscribes small machines badly.
            (
                "OMP_NUM_THREADS",
                env::var_os("OMP_NUM_THREADS").unwrap_or_else(|| "1".into()),
            ),
        ];
        vars.extend(self.extra.iter().cloned());
        vars
    }

    fn command(&self, root: &Path, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(root).envs(self.vars());
        cmd
    }
}

fn prepend(dir: &Path, rest: Option<OsString>) -> OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(rest) = rest {
        paths.extend(env::split_paths(&rest));
    }
    env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

fn setup(root: &Path) -> Result<BuildEnv> {
    install_apt_packages()?;
    ensure_venv(root)?;
    BuildEnv::discover(root)
}

fn install_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let sudo = !is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        check(&mut cmd)
    };
    apt(&["update", "-q"])?;
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The project venv: `FEDMESH_VENV` where a build cache outlives the clone (CI), else `.venv`.
fn venv_dir(root: &Path) -> PathBuf {
    env::var_os("FEDMESH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv"))
}

fn ensure_venv(root: &Path) -> Result<()> {
    let venv = venv_dir(root);
    let python = venv.join("bin/python");
    let stamp = venv.join(".fedmesh-requirements");
    let wanted = std::iter::once(TORCH_REQUIREMENT)
        .chain(PYTHON_REQUIREMENTS.iter().copied())
        .collect::<Vec<_>>()
        .join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        return Ok(());
    }

    if !python.exists() {
        eprintln!("xtask: creating the project venv at {}", venv.display());
        check(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    eprintln!(
        "xtask: installing {} into the venv (a few minutes, once)",
        wanted.replace('\n', " ")
    );
    check(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(wanted.lines()),
    )?;
    std::fs::write(&stamp, wanted).context("writing the venv stamp")?;
    Ok(())
}

fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo(env: &BuildEnv, root: &Path, args: &[&str]) -> Result<()> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    check(env.command(root, &cargo).args(args))
}

/// Builds the lab and the three services in release mode, then runs the main job through
/// `netlab run` into `out/<scenario name>-<unix time>` (or wherever `--out` in `rest` says).
fn demo(root: &Path, env: &BuildEnv, rest: &[String]) -> Result<()> {
    cargo(
        env,
        root,
        &[
            "build",
            "--release",
            "--package",
            "fedmesh-netlab",
            "--package",
            "fedmesh-core-agg",
            "--package",
            "fedmesh-pop-proxy",
            "--package",
            "fedmesh-store-agent",
        ],
    )?;
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let netlab = target.join("release/netlab");

    let mut args: Vec<OsString> = vec!["run".into()];
    if !rest.iter().any(|a| a == "--scenario") {
        args.extend([
            "--scenario".into(),
            root.join(MAIN_SCENARIO).into_os_string(),
        ]);
    }
    if !rest.iter().any(|a| a == "--out") {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        // Named after the scenario run: the main job's unless `--scenario` says otherwise.
        let scenario = rest
            .iter()
            .position(|a| a == "--scenario")
            .and_then(|i| rest.get(i + 1))
            .map_or(MAIN_SCENARIO, String::as_str);
        let name = Path::new(scenario)
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy());
        let out = root.join(format!("out/{name}-{stamp}"));
        eprintln!("xtask: the report goes to {}", out.display());
        args.extend(["--out".into(), out.into_os_string()]);
    }
    args.extend(rest.iter().map(OsString::from));
    check(env.command(root, &netlab.to_string_lossy()).args(args))
}

/// The workspace's own crates that read `env!("CARGO_MANIFEST_DIR")`, directly or through
/// a dependency.
const PATH_BAKING_CRATES: [&str; 8] = [
    "fedmesh-protocol",
    "fedmesh-transport",
    "fedmesh-policy",
    "fedmesh-core-agg",
    "fedmesh-pop-proxy",
    "fedmesh-store-agent",
    "fedmesh-netlab",
    "fedmesh-mesh-tests",
];

/// Cargo does not rebuild a workspace crate when the same sources move to another path, so
/// a build cache shared by clones at different paths (CI's) keeps binaries with the old
/// clone's `CARGO_MANIFEST_DIR` baked in. When the clone's path differs from the one the
/// cache was last built from, the workspace's crates (not their dependencies) are cleaned.
fn forget_moved_workspace(root: &Path, env: &BuildEnv) -> Result<()> {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let marker = target.join(".fedmesh-workspace");
    let here = root.canonicalize()?.to_string_lossy().into_owned();
    let built_from = std::fs::read_to_string(&marker).unwrap_or_default();
    if built_from.trim() == here || !target.exists() {
        std::fs::create_dir_all(&target)?;
        return Ok(std::fs::write(&marker, &here)?);
    }
    eprintln!(
        "xtask: the build cache was built from {built_from:?}; rebuilding the workspace's crates"
    );
    let mut args = vec!["clean"];
    for krate in PATH_BAKING_CRATES {
        args.extend(["--package", krate]);
    }
    cargo(env, root, &args)?;
    Ok(std::fs::write(&marker, &here)?)
}

/// Fetches the OPA reference engine that the policy crate's differential test compares
/// regorus against, and returns where it was unpacked.
fn ensure_opa(root: &Path) -> Result<PathBuf> {
    let site = root.join("target/opa/site");
    check(
        Command::new("bash")
            .arg(root.join("scripts/opa/setup.sh"))
            .env("FEDMESH_OPA_DIR", &site)
            .stdout(std::process::Stdio::null()),
    )?;
    Ok(site)
}

fn test(root: &Path, env: &BuildEnv) -> Result<()> {
    forget_moved_workspace(root, env)?;
    let mut env = env.clone();
    env.extra
        .push(("FEDMESH_OPA_DIR", ensure_opa(root)?.into_os_string()));
    let env = &env;
    let features = ["--features", TEST_FEATURES];

    cargo(env, root, &["fmt", "--all", "--", "--check"])?;
    let mut clippy = vec!["clippy", "--workspace", "--all-targets"];
    clippy.extend(features);
    clippy.extend(["--", "-D", "warnings"]);
    cargo(env, root, &clippy)?;
    // Benchmarks are linted above but not run here: they are sized for `cargo xtask bench`.
    let mut tests = vec!["test", "--workspace", "--lib", "--bins", "--tests"];
    tests.extend(features);
    cargo(env, root, &tests)?;
    cargo(env, root, &["test", "--workspace", "--doc"])
}

fn bench(root: &Path, env: &BuildEnv, rest: &[String]) -> Result<()> {
    let mut args = vec!["bench"];
    match rest.first() {
        Some(pkg) => args.extend(["--package", pkg.as_str()]),
        None => args.push("--workspace"),
    }
    cargo(env, root, &args)
}
