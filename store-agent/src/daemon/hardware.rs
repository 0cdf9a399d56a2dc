//! What the machine offers, detected once at start-up, and what the agent chooses from
//! it: device, precision, libtorch threads and a cap on the batch size.

use serde::Serialize;

use crate::config::ResourcesSection;
use crate::model::{Precision, pick_device};
use crate::task::{DeviceChoice, ModelSpec};

/// The machine as detected and the choices made for it.
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    /// Whether libtorch sees a CUDA device.
    pub cuda: bool,
    /// CUDA devices seen.
    pub cuda_devices: usize,
    /// Whether a bf16 matrix product works on the chosen device.
    pub bf16: bool,
    /// CPU cores available to this process.
    pub cores: usize,
    /// Memory available now, MiB (`MemAvailable` of /proc/meminfo), if readable.
    pub memory_available_mib: Option<u64>,
    /// The device training uses.
    pub device: DeviceChoice,
    /// Whether training runs its products in bf16.
    pub precision_bf16: bool,
    /// libtorch intra-op threads, also how many stores train at once.
    pub threads: usize,
    /// Memory training may use, MiB: the configured budget, capped by what is available.
    pub training_memory_mib: u64,
    /// The configured cap on the batch size (0: chosen per model from the memory).
    pub batch_cap: usize,
}

impl Hardware {
    /// Detects the machine and chooses for `resources`.
    ///
    /// # Errors
    ///
    /// When `device = "cuda"` is configured and libtorch sees no CUDA device.
    pub fn detect(resources: &ResourcesSection) -> Result<Self, crate::model::ModelError> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let cuda = tch::Cuda::is_available();
        let cuda_devices = if cuda {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        let (device, precision) = pick_device(resources.device)?;
        let memory_available_mib = meminfo_available_mib();
        let training_memory_mib = memory_available_mib.map_or(resources.memory_mib, |available| {
            resources.memory_mib.min(available)
        });
        let threads = match resources.threads {
            0 => cores,
            n => n.min(cores.max(1)),
        };
        Ok(Self {
            cuda,
            cuda_devices,
            bf16: precision == Precision::Bf16,
            cores,
            memory_available_mib,
            device: if device.is_cuda() {
                DeviceChoice::Cuda
            } else {
                DeviceChoice::Cpu
            },
            precision_bf16: precision == Precision::Bf16,
            threads,
            training_memory_mib,
            batch_cap: resources.batch_size,
        })
    }

    /// The batch size to train `spec` with when the task asks for `asked`: at most the
    /// configured cap, and small enough that a batch's activations and gradients (about
    /// 16 bytes per unit per row: forward value, gradient, optimiser slack) stay within a
    /// quarter of the training memory.
    pub fn batch_size(&self, spec: &ModelSpec, asked: usize) -> usize {
        let units: usize = match spec {
            ModelSpec::Mlp {
                inputs,
                hidden,
                outputs,
                ..
            } => inputs + hidden.iter().sum::<usize>() + outputs,
            ModelSpec::Cnn {
                input, channels, ..
            } => input.iter().product::<usize>() * (1 + channels.len()),
        };
        let budget = (self.training_memory_mib as usize).saturating_mul(1 << 20) / 4;
        let fits = (budget / (16 * units.max(1))).max(1);
        let capped = match self.batch_cap {
            0 => asked,
            cap => asked.min(cap),
        };
        capped.min(fits).max(1)
    }
}

/// `MemAvailable` from /proc/meminfo, in MiB.
fn meminfo_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Activation, Objective};

    fn hardware(memory_mib: u64, cap: usize) -> Hardware {
        Hardware {
            cuda: false,
            cuda_devices: 0,
            bf16: false,
            cores: 2,
            memory_available_mib: Some(memory_mib),
            device: DeviceChoice::Cpu,
            precision_bf16: false,
            threads: 1,
            training_memory_mib: memory_mib,
            batch_cap: cap,
        }
    }

    fn mlp() -> ModelSpec {
        ModelSpec::Mlp {
            inputs: 47,
            hidden: vec![64, 32],
            outputs: 1,
            activation: Activation::Relu,
            objective: Objective::Regression,
            local: vec![],
        }
    }

    #[test]
    fn batch_size_follows_the_task_within_the_cap_and_the_memory() {
        // 2 GiB: a quarter is 512 MiB, far above 256 rows of 144 units.
        assert_eq!(hardware(2048, 0).batch_size(&mlp(), 256), 256);
        assert_eq!(hardware(2048, 64).batch_size(&mlp(), 256), 64);
        // 1 MiB: 262,144 bytes / (16 * 144 units) = 113 rows.
        assert_eq!(hardware(1, 0).batch_size(&mlp(), 256), 113);
    }

    #[test]
    fn detection_reports_at_least_one_core_and_thread() {
        let detected = Hardware::detect(&ResourcesSection {
            device: DeviceChoice::Cpu,
            ..ResourcesSection::default()
        })
        .expect("cpu is always there");
        assert!(detected.cores >= 1 && detected.threads >= 1);
        assert_eq!(detected.device, DeviceChoice::Cpu);
    }
}
