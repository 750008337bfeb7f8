//! `beltad sweep`: the paper's sensitivity studies on any data set.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use beltad::atomic_write::{AtomicFile, write_atomic};
use beltad::config::Config;
use beltad::dataset;
use beltad::feature_cache::FeatureCache;
use beltad::features::FeatureExtractor;
use beltad::progress::Progress;
use beltad::report::plots;
use beltad::sweep::{SweepContext, SweepResult, SweepSpec, run_sweep};
use beltad::weights::WeightsSearch;

use super::{BackboneArgs, ConfigArgs, create_dir};

/// The paper's three studies: τ, the object branch's input size, the
/// attribution branch's input size (ViT sizes are multiples of 14).
pub const PAPER_SWEEPS: [&str; 3] = [
    "object.tau=1.05:1.25:0.01",
    "object.input_size=224:504:28",
    "attribution.input_size=308:420:14",
];

/// Sweep configuration fields and report the metrics at every value.
///
/// Each --sweep FIELD=VALUES varies one numeric field of the config (dotted
/// path, as `beltad config` prints it) over START:STOP:STEP or a list
/// V1,V2,..., fitting on train/good and evaluating on the test split at each
/// point. Backbone features are cached (in --cache, default OUT/feature-cache),
/// so points that change only scoring (τ, smoothing, fusion) cost little more
/// than one evaluation. Writes OUT/sweeps.json, OUT/sweeps.csv, one SVG plot
/// per field and OUT/index.html.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// MVTec-layout data set.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A field and its values, e.g. object.tau=1.05:1.25:0.01 (repeatable).
    #[arg(
        long = "sweep",
        value_name = "FIELD=VALUES",
        required_unless_present = "paper"
    )]
    sweeps: Vec<String>,
    /// Run the paper's three studies: object.tau 1.05–1.25, object.input_size
    /// 224–504, attribution.input_size 308–420.
    #[arg(long)]
    paper: bool,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    backbones: BackboneArgs,
}

pub fn run(args: &SweepArgs, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let mut texts: Vec<String> = args.sweeps.clone();
    if args.paper {
        texts.extend(PAPER_SWEEPS.iter().map(|s| s.to_string()));
    }
    let specs: Vec<SweepSpec> = texts
        .iter()
        .map(|t| SweepSpec::parse(t))
        .collect::<Result<_, _>>()?;
    let base = args.config.load()?;
    for spec in &specs {
        for &v in &spec.values {
            spec.apply(&base, v)?;
        }
    }
    dataset::test_samples(&args.data)?;
    create_dir(&args.out)?;

    let cache_dir = args
        .backbones
        .cache_dir()
        .unwrap_or_else(|| args.out.join("feature-cache"));
    let cache = FeatureCache::open(&cache_dir)
        .with_context(|| format!("{}: cannot open feature cache", cache_dir.display()))?;
    let backbones = args.backbones.clone();
    let load = move |config: &Config| -> Result<FeatureExtractor, String> {
        let search = WeightsSearch::new(backbones.weights_dir());
        FeatureExtractor::load(config, &search)
            .map(|e| {
                e.with_batch_size(backbones.batch_size())
                    .with_limits(backbones.limits())
                    .with_cache(cache.clone())
            })
            .map_err(|e| e.to_string())
    };
    let ctx = SweepContext {
        data: args.data.clone(),
        dataset: dataset::name(&args.data),
        training_images: dataset::training_images(&args.data)?,
        limits: args.backbones.limits(),
        load: &load,
    };

    let mut results = Vec::with_capacity(specs.len());
    for spec in &specs {
        let result = run_sweep(&base, spec, &ctx, progress)?;
        print_sweep(&result);
        results.push(result);
        write_outputs(&args.out, &ctx.dataset, &results)?;
    }
    println!(
        "sweeps written to {}",
        args.out.join("index.html").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_sweep(r: &SweepResult) {
    println!("\n{}:", r.field);
    println!(
        "{:>10} {:>12} {:>12} {:>10} {:>9}",
        "value", "image AUROC", "pixel AUROC", "AUPRO@0.3", "refitted"
    );
    for p in &r.points {
        println!(
            "{:>10} {:>12.4} {:>12.4} {:>10.4} {:>9}",
            p.value, p.fused.image_auroc, p.fused.pixel_auroc, p.fused.aupro_0_3, p.refitted
        );
    }
}

/// JSON, CSV, one plot per field and an HTML page, all rewritten after each sweep.
fn write_outputs(
    out: &std::path::Path,
    dataset: &str,
    results: &[SweepResult],
) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(results)? + "\n";
    write_atomic(&out.join("sweeps.json"), json.as_bytes()).context("cannot write sweeps.json")?;

    let mut csv =
        AtomicFile::create(&out.join("sweeps.csv")).context("cannot create sweeps.csv")?;
    writeln!(
        csv,
        "field,value,output,image_auroc,pixel_auroc,aupro_0_3,refitted"
    )?;
    let mut html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>beltad sweeps: {dataset}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px}}\
         td,th{{padding:2px 10px;text-align:right}}</style></head><body><h1>beltad sweeps: {dataset}</h1>"
    );
    for r in results {
        let mut series = Vec::new();
        for (name, pick) in [
            (
                "image AUROC",
                (|p: &beltad::sweep::SweepPoint| p.fused.image_auroc) as fn(&_) -> f64,
            ),
            ("pixel AUROC", |p| p.fused.pixel_auroc),
            ("AUPRO@0.3", |p| p.fused.aupro_0_3),
        ] {
            series.push((
                name.to_string(),
                r.points.iter().map(|p| (p.value, pick(p))).collect(),
            ));
        }
        let svg = plots::sweep(&format!("{dataset}: {}", r.field), &r.field, &series)
            .map_err(anyhow::Error::msg)?;
        let file = format!("{}.svg", r.field.replace('.', "_"));
        write_atomic(&out.join(&file), svg.as_bytes())
            .with_context(|| format!("cannot write {file}"))?;
        let _ = write!(
            html,
            "<h2>{}</h2><img src=\"{file}\" alt=\"{} sweep\"><table><tr><th>value</th><th>image AUROC</th>\
             <th>pixel AUROC</th><th>AUPRO@0.3</th></tr>",
            r.field, r.field
        );
        for p in &r.points {
            for (output, m) in [
                ("fused", &p.fused),
                ("object", &p.object),
                ("attribution", &p.attribution),
                ("texture", &p.texture),
            ] {
                writeln!(
                    csv,
                    "{},{},{output},{},{},{},{}",
                    r.field, p.value, m.image_auroc, m.pixel_auroc, m.aupro_0_3, p.refitted
                )?;
            }
            let m = &p.fused;
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td></tr>",
                p.value, m.image_auroc, m.pixel_auroc, m.aupro_0_3
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    csv.commit().context("cannot write sweeps.csv")?;
    write_atomic(&out.join("index.html"), html.as_bytes()).context("cannot write index.html")?;
    Ok(())
}
