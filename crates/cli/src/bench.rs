//! `pkvm bench`: the demand-paging matrix (1 vCPU, backings x modes x
//! checker) and the vCPU sweep (`--sweep-vcpus 1,2,4`), with the median of
//! `--repeat` runs per configuration, a progress line per run on stderr,
//! and (`--svg FILE`) a plot of the sweep.

use std::io::Write;

use anyhow::{bail, Context, Result};
use pkvm_machine::demand_paging::{self, Backing, Config, Report};
use pkvm_machine::Mode;

use crate::{human, parse_size, BackingArg, CheckArg};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Bytes of guest memory per vCPU and run (suffixes K, M, G).
    #[arg(short = 'b', long = "bytes", default_value = "256M", value_parser = parse_size)]
    pub bytes: u64,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Sweep the vCPU count instead of the matrix: a comma-separated list,
    /// e.g. 1,2,4,8,16. Each mode is run at each count.
    #[arg(long = "sweep-vcpus", value_parser = parse_vcpu_list)]
    pub sweep_vcpus: Option<VcpuList>,
    /// With --sweep-vcpus: write a plot of overall and per-vCPU pages/s
    /// against vCPUs (one line per mode) to this SVG file.
    #[arg(long, requires = "sweep_vcpus")]
    pub svg: Option<std::path::PathBuf>,
    /// With --sweep-vcpus: the memory backing.
    #[arg(short = 's', long = "backing", value_enum, default_value_t = BackingArg::Anonymous)]
    pub backing: BackingArg,
    /// With --sweep-vcpus: TLB coherence checking.
    #[arg(long, value_enum, default_value_t = CheckArg::Off)]
    pub check: CheckArg,
    /// Run even if the host seems to have too little memory available.
    #[arg(long)]
    pub force: bool,
}

/// A parsed `--sweep-vcpus` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuList(pub Vec<usize>);

/// Most vCPUs one sweep point may ask for.
const MAX_SWEEP_VCPUS: usize = 16;

fn parse_vcpu_list(s: &str) -> Result<VcpuList, String> {
    let mut v = Vec::new();
    for part in s.split(',') {
        let n: usize = part
            .trim()
            .parse()
            .map_err(|_| format!("`{part}` is not a vCPU count (expected e.g. 1,2,4)"))?;
        if n == 0 || n > MAX_SWEEP_VCPUS {
            return Err(format!("vCPU count {n} is outside 1..={MAX_SWEEP_VCPUS}"));
        }
        if v.contains(&n) {
            return Err(format!("vCPU count {n} is listed twice"));
        }
        v.push(n);
    }
    Ok(VcpuList(v))
}

/// The system modes a bench covers: name, mode, protected VM.
const MODES: [(&str, Mode, bool); 3] = [
    ("standard", Mode::Standard, false),
    ("protected (shared)", Mode::Protected, false),
    ("protected VM (donated)", Mode::Protected, true),
];

/// One measured configuration: the median run of `repeat`.
struct Point {
    label: String,
    mode: &'static str,
    vcpus: usize,
    overall: Vec<f64>,
    median: Report,
}

impl Point {
    fn per_vcpu(&self) -> f64 {
        self.median.overall_pages_per_sec / self.vcpus as f64
    }
}

/// Runs `cfg` `repeat` times, printing a progress line per run; returns the
/// point with the median run (by overall pages/s) and whether every run's
/// checks passed.
fn measure(
    cfg: &Config,
    label: String,
    mode: &'static str,
    repeat: u32,
    step: (usize, usize),
) -> Result<(Point, bool)> {
    let mut runs = Vec::new();
    let mut ok = true;
    for i in 1..=repeat {
        eprint!("[{}/{}] {label}: run {i}/{repeat} ... ", step.0, step.1);
        let _ = std::io::stderr().flush();
        let r = demand_paging::run(cfg).with_context(|| label.clone())?;
        let good = r.coherence_violations == 0 && r.frames_leaked == 0 && r.hyp_pages_leaked == 0;
        eprintln!(
            "{:.0} pages/s{}",
            r.overall_pages_per_sec,
            if good { "" } else { " CHECKS FAILED" }
        );
        ok &= good;
        runs.push(r);
    }
    runs.sort_by(|a, b| a.overall_pages_per_sec.total_cmp(&b.overall_pages_per_sec));
    let overall = runs.iter().map(|r| r.overall_pages_per_sec).collect();
    let median = runs.swap_remove(runs.len() / 2);
    Ok((
        Point {
            label,
            mode,
            vcpus: cfg.vcpus,
            overall,
            median,
        },
        ok,
    ))
}

fn base_config(a: &BenchArgs) -> Config {
    Config {
        bytes_per_vcpu: a.bytes,
        prefault: true,
        verify: false,
        ..Config::default()
    }
}

/// `pkvm bench`.
pub fn bench(a: BenchArgs) -> Result<bool> {
    let most = a
        .sweep_vcpus
        .as_ref()
        .map_or(1, |l| l.0.iter().copied().max().unwrap_or(1));
    let biggest = Config {
        vcpus: most,
        ..base_config(&a)
    };
    let needed = demand_paging::host_memory_needed(&biggest)?;
    let what = format!("guest memory {} x {most} vCPU(s)", human(a.bytes));
    crate::hostmem::check(needed, crate::hostmem::available(), a.force, &what)?;
    match &a.sweep_vcpus {
        Some(list) => sweep(&a, &list.0),
        None => matrix(&a),
    }
}

fn matrix(a: &BenchArgs) -> Result<bool> {
    let backings = [
        ("anonymous", Backing::Anonymous),
        ("anonymous_thp", Backing::AnonymousThp),
        ("hugetlb_2m", Backing::Hugetlb2M),
        ("hugetlb_1g", Backing::Hugetlb1G),
    ];
    let checks = [
        ("off", demand_paging::Coherence::Off),
        ("every-use", demand_paging::Coherence::EveryUse),
    ];
    let mut plan = Vec::new();
    for (bname, backing) in backings {
        if !a.bytes.is_multiple_of(granule(backing)) {
            eprintln!("bench: skipping {bname}: -b is not a multiple of its page size");
            continue;
        }
        for (mname, mode, protected_vm) in MODES {
            for (cname, coherence) in checks {
                let cfg = Config {
                    backing,
                    mode,
                    protected_vm,
                    coherence,
                    ..base_config(a)
                };
                plan.push((format!("{bname} | {mname} | {cname}"), mname, cfg));
            }
        }
    }
    let (points, ok) = run_plan(plan, a.repeat)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(a, &points))?);
        return Ok(ok);
    }
    println!(
        "demand paging, 1 vCPU x {}, median of {} runs (pages/s; faults; mappings 4K/2M/1G)",
        human(a.bytes),
        a.repeat
    );
    println!("| backing | mode | checker | pages/s (median) | runs | faults | mappings |");
    println!("|---|---|---|---|---|---|---|");
    for p in &points {
        let f = &p.median.faults;
        println!(
            "| {} | {:.0} | {} | {} | {}/{}/{} |",
            p.label,
            p.median.overall_pages_per_sec,
            runs(&p.overall),
            f.translation,
            f.maps_4k,
            f.maps_2m,
            f.maps_1g
        );
    }
    Ok(ok)
}

fn granule(b: Backing) -> u64 {
    match b {
        Backing::Anonymous => 4 << 10,
        Backing::AnonymousThp | Backing::Hugetlb2M => 2 << 20,
        Backing::Hugetlb1G => 1 << 30,
    }
}

fn runs(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_plan(plan: Vec<(String, &'static str, Config)>, repeat: u32) -> Result<(Vec<Point>, bool)> {
    let total = plan.len();
    let mut points = Vec::new();
    let mut ok = true;
    for (i, (label, mode, cfg)) in plan.into_iter().enumerate() {
        let (p, good) = measure(&cfg, label, mode, repeat, (i + 1, total))?;
        ok &= good;
        points.push(p);
    }
    Ok((points, ok))
}

fn sweep(a: &BenchArgs, vcpus: &[usize]) -> Result<bool> {
    let backing = Backing::from(a.backing);
    if !a.bytes.is_multiple_of(granule(backing)) {
        bail!(
            "-b {} is not a multiple of the {:?} page size",
            human(a.bytes),
            backing
        );
    }
    let mut plan = Vec::new();
    for (mname, mode, protected_vm) in MODES {
        for &n in vcpus {
            let cfg = Config {
                vcpus: n,
                backing,
                mode,
                protected_vm,
                coherence: a.check.into(),
                ..base_config(a)
            };
            plan.push((format!("{mname}, {n} vCPU(s)"), mname, cfg));
        }
    }
    let (points, ok) = run_plan(plan, a.repeat)?;
    if let Some(path) = &a.svg {
        plot(path, a, &points).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: plot written to {}", path.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json(a, &points))?);
        return Ok(ok);
    }
    println!(
        "demand paging sweep, {} per vCPU, {:?}, checker {:?}, median of {} runs",
        human(a.bytes),
        backing,
        a.check,
        a.repeat
    );
    println!("| mode | vCPUs | overall pages/s | per-vCPU pages/s | speed-up vs first | runs |");
    println!("|---|---|---|---|---|---|");
    for p in &points {
        let first = points
            .iter()
            .find(|q| q.mode == p.mode)
            .map_or(1.0, |q| q.median.overall_pages_per_sec);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x | {} |",
            p.mode,
            p.vcpus,
            p.median.overall_pages_per_sec,
            p.per_vcpu(),
            p.median.overall_pages_per_sec / first,
            runs(&p.overall)
        );
    }
    Ok(ok)
}

fn json(a: &BenchArgs, points: &[Point]) -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "bytes_per_vcpu": a.bytes,
        "repeat": a.repeat,
        "statistic": "median",
        "points": points.iter().map(|p| serde_json::json!({
            "label": p.label,
            "mode": p.mode,
            "vcpus": p.vcpus,
            "overall_pages_per_sec_runs": p.overall,
            "per_vcpu_pages_per_sec": p.per_vcpu(),
            "median": p.median,
        })).collect::<Vec<_>>(),
    })
}

/// Draws overall (left) and per-vCPU (right) pages/s against vCPUs, one
/// line per mode.
fn plot(path: &std::path::Path, a: &BenchArgs, points: &[Point]) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let max_v = points.iter().map(|p| p.vcpus).max().unwrap_or(1) as f64;
    let title = format!("{} per vCPU, checker {:?}", human(a.bytes), a.check);
    type Value = fn(&Point) -> f64;
    let panels: [(_, &str, Value); 2] = [
        (&left, "overall pages/s", |p| p.median.overall_pages_per_sec),
        (&right, "per-vCPU pages/s", |p| p.per_vcpu()),
    ];
    for (area, what, value) in panels {
        let max_y = points.iter().map(value).fold(0.0, f64::max) * 1.1 + 1.0;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{what} ({title})"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_v + 1.0, 0.0..max_y)?;
        chart.configure_mesh().x_desc("vCPUs").y_desc(what).draw()?;
        for (i, (mode, ..)) in MODES.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.mode == *mode)
                .map(|p| (p.vcpus as f64, value(p)))
                .collect();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
                .label(*mode)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(
                series
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_vcpu_list("1,2, 4"), Ok(VcpuList(vec![1, 2, 4])));
        assert!(parse_vcpu_list("1,,2").is_err());
        assert!(parse_vcpu_list("0").is_err());
        assert!(parse_vcpu_list("2,2").is_err());
        assert!(parse_vcpu_list("17").is_err());
        assert!(parse_vcpu_list("x").is_err());
    }

    #[test]
    fn a_small_sweep_measures_every_point_and_plots_it() {
        let dir = std::env::temp_dir().join(format!("pkvm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("sweep.svg");
        let a = BenchArgs {
            bytes: 1 << 20,
            repeat: 1,
            json: true,
            sweep_vcpus: Some(VcpuList(vec![1, 2])),
            svg: Some(svg.clone()),
            backing: BackingArg::Anonymous,
            check: CheckArg::Off,
            force: false,
        };
        assert!(bench(a).unwrap());
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg"),
            "not an SVG: {}",
            &text[..40.min(text.len())]
        );
        for mode in MODES.map(|m| m.0) {
            assert!(text.contains(mode), "legend lacks {mode}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
