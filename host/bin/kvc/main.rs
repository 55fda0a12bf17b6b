//! `kvc`: the kvcompress command. `demo` shows what KV-Compress buys and costs on a model's
//! geometry; `verify` checks every kernel on the CUDA device against the CPU reference;
//! `bench` measures kernels against the copy roofline.

mod bench;
mod demo;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kvcompress::{Budget, CompressArgs, DType, Mode};

use bench::{BenchOpts, ModelArgs};

#[derive(Parser)]
#[command(
    name = "kvc",
    version,
    about = "KV-Compress kernels: demo, verify, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill, aggregate, compress at several rates (variable per-head rates vs uniform rates
    /// vs random eviction, at equal memory), decode on; report memory and fidelity.
    Demo(demo::DemoArgs),
    /// Run every kernel on the CUDA device against the CPU reference on random inputs of a
    /// model's shape; exit non-zero on any mismatch.
    Verify {
        #[arg(long, value_enum, default_value_t = Preset::Llama31_8b)]
        model: Preset,
        #[arg(long, default_value_t = 2)]
        batch: u32,
        #[arg(long, default_value_t = 2048)]
        context: u32,
        /// Layers to check (the CPU reference is slow; the kernels do not depend on it).
        #[arg(long, default_value_t = 2)]
        layers: u32,
        #[arg(long, default_value_t = 11)]
        seed: u64,
    },
    /// Benchmark a kernel on the CUDA device.
    Bench {
        #[command(subcommand)]
        kernel: BenchKernel,
    },
}

#[derive(Subcommand)]
enum BenchKernel {
    /// Paged decode attention, with and without L2 recording.
    Decode {
        /// Batch x context shapes, comma-separated.
        #[arg(
            long,
            default_value = "1x32768,16x8192,64x4096,256x1024",
            value_delimiter = ','
        )]
        shapes: Vec<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        opts: BenchOpts,
    },
    /// One compression step (schedule, compaction, allocator) over every layer, against one
    /// decode step over every layer at the same batch.
    Compress {
        /// Batch x context shapes, comma-separated.
        #[arg(long, default_value = "1x32768,16x8192", value_delimiter = ',')]
        shapes: Vec<String>,
        /// Layers of the model.
        #[arg(long, default_value_t = 32)]
        layers: u32,
        /// Compression rate.
        #[arg(long, default_value_t = 8.0)]
        rate: f32,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        opts: BenchOpts,
    },
    /// Appending new KVs: a decode step's one token per sequence, and a prefill's prompt.
    Append {
        /// Batch x new tokens per sequence, comma-separated.
        #[arg(long, default_value = "256x1,16x2048,1x32768", value_delimiter = ',')]
        shapes: Vec<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        opts: BenchOpts,
    },
    /// Observation-window aggregation after a prefill of one sequence, one layer.
    Aggregate {
        /// Prompt lengths, comma-separated.
        #[arg(long, default_value = "32768", value_delimiter = ',')]
        prompts: Vec<u32>,
        /// Window queries; 0 means the whole prompt (full range).
        #[arg(long, default_value_t = 32)]
        window: u32,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        opts: BenchOpts,
    },
}

/// Model geometries of the demo and `verify`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// 32 layers, 8 KV heads, 32 query heads, D 128.
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
    /// The same shape as llama-3.1-8b.
    #[value(name = "mistral-7b-v0.2")]
    Mistral7bV02,
    /// 80 layers, 8 KV heads, 64 query heads, D 128.
    #[value(name = "llama-3.1-70b")]
    Llama31_70b,
    /// 2 layers, 4 KV heads, 8 query heads, D 64: seconds on the CPU reference.
    #[value(name = "tiny")]
    Tiny,
}

/// The command-line name of a preset.
pub fn preset_name(p: Preset) -> &'static str {
    match p {
        Preset::Llama31_8b => "llama-3.1-8b",
        Preset::Mistral7bV02 => "mistral-7b-v0.2",
        Preset::Llama31_70b => "llama-3.1-70b",
        Preset::Tiny => "tiny",
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Device {
    Auto,
    Cuda,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::Bf16,
            Dtype::F32 => DType::F32,
        }
    }
}

pub type AnyResult = Result<(), Box<dyn std::error::Error>>;

/// One compression budget for every sequence of a batch, with the settings `verify` and
/// `bench` share: the last 32 tokens protected, 4 sinks, variable per-head rates.
pub struct WholeBatch {
    seqs: Vec<u32>,
    budgets: Vec<Budget>,
    protected: Vec<u32>,
}

impl WholeBatch {
    pub fn new(batch: u32, budget: Budget) -> Self {
        Self {
            seqs: (0..batch).collect(),
            budgets: vec![budget; batch as usize],
            protected: vec![32; batch as usize],
        }
    }

    pub fn args(&self) -> CompressArgs<'_> {
        CompressArgs {
            seqs: &self.seqs,
            budgets: &self.budgets,
            protected: &self.protected,
            sinks: 4,
            mode: Mode::Variable,
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Demo(args) => demo::demo(args),
        Command::Verify {
            model,
            batch,
            context,
            layers,
            seed,
        } => verify::verify(model, batch, context, layers, seed),
        Command::Bench { kernel } => match kernel {
            BenchKernel::Decode {
                shapes,
                model,
                opts,
            } => bench::bench_decode(&shapes, &model, &opts),
            BenchKernel::Compress {
                shapes,
                layers,
                rate,
                model,
                opts,
            } => bench::bench_compress(&shapes, layers, rate, &model, &opts),
            BenchKernel::Append {
                shapes,
                model,
                opts,
            } => bench::bench_append(&shapes, &model, &opts),
            BenchKernel::Aggregate {
                prompts,
                window,
                model,
                opts,
            } => bench::bench_aggregate(&prompts, window, &model, &opts),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvc: {e}");
            ExitCode::FAILURE
        }
    }
}
