//! Assembling the report page: plain HTML and CSS, plots inline as SVG,
//! gallery pictures linked relatively, no scripts.

use std::fmt::Write;

use super::Plots;
use crate::detector::Detector;
use crate::evaluate::{Details, Evaluation, GalleryItem, GalleryKind, Metrics};

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1b1b1b}\
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #e3e3e3;text-align:right}\
td:first-child,th:first-child{text-align:left}.best{font-weight:bold}\
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}\
.gallery{display:flex;flex-wrap:wrap;gap:14px}.gallery figure{margin:0;font-size:12px}\
.gallery img{display:block;border:1px solid #ccc}.note{color:#555;font-size:13px}";

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole page.
pub fn page(
    e: &Evaluation,
    detector: &Detector,
    d: &Details,
    plots: &Plots,
    gallery: &[(&GalleryItem, String)],
) -> String {
    let mut out = String::new();
    let title = format!("beltad report: {}", escape(&e.dataset));
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title}</h1>"
    );
    summary(&mut out, e, detector, d);
    metrics_table(&mut out, e);
    rules_table(&mut out, e);
    ablation_table(&mut out, e);
    out.push_str("<h2>Curves and scores</h2><div class=\"plots\">");
    for (caption, svg) in &plots.svgs {
        let _ = write!(
            out,
            "<figure aria-label=\"{}\">{svg}</figure>",
            escape(caption)
        );
    }
    out.push_str("</div>");
    gallery_section(&mut out, gallery);
    out.push_str("</body></html>\n");
    out
}

fn summary(out: &mut String, e: &Evaluation, detector: &Detector, d: &Details) {
    let anomalous = e.images.iter().filter(|r| r.defect.is_some()).count();
    let normal = e.n_test_images - anomalous;
    let p = &detector.provenance;
    let c = &detector.config;
    let _ = write!(
        out,
        "<p>{} test images ({normal} normal, {anomalous} anomalous); model fitted on {} images \
         ({} held out for calibration); backbones {} @{}, {} @{}, {} @{}; fusion rule <b>{}</b>, \
         image score <b>{}</b>; {:.3} s per image.</p>",
        e.n_test_images,
        p.n_fit_images,
        p.n_calibration_images,
        c.object.backbone,
        c.object.input_size,
        c.attribution.backbone,
        c.attribution.input_size,
        c.texture.backbone,
        c.texture.input_size,
        escape(&e.fusion_rule),
        escape(&e.image_score_rule),
        e.seconds_per_image
    );
    let f1_at = |t: f64| {
        let flagged = |anomalous: bool| {
            e.images
                .iter()
                .filter(|r| r.defect.is_some() == anomalous && r.fused_score > t)
                .count() as f64
        };
        let tp = flagged(true);
        2.0 * tp / (tp + flagged(false) + anomalous as f64)
    };
    out.push_str("<h2>Thresholds</h2><table><tr><th>threshold</th><th>value</th><th>F1 on this test set</th></tr>");
    if let Some(t) = e.threshold {
        let _ = write!(
            out,
            "<tr><td>model threshold: {}-quantile of held-out normal scores (no labels)</td><td>{t:.4}</td><td>{:.3}</td></tr>",
            c.calibration.threshold_quantile,
            f1_at(t)
        );
    }
    let _ = write!(
        out,
        "<tr><td>F1-optimal on the test labels (for reference only)</td><td>{:.4}</td><td>{:.3}</td></tr></table>",
        d.f1_optimal.0, d.f1_optimal.1
    );
}

fn metric_cells(out: &mut String, m: &Metrics) {
    let _ = write!(
        out,
        "<td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td>",
        m.image_auroc, m.pixel_auroc, m.aupro_0_3, m.aupro_0_3_reference
    );
}

fn metrics_table(out: &mut String, e: &Evaluation) {
    out.push_str(
        "<h2>Metrics</h2><table><tr><th>output</th><th>image AUROC</th><th>pixel AUROC</th>\
         <th>AUPRO@0.3</th><th>AUPRO@0.3 (reference variant)</th></tr>",
    );
    for (name, m) in [
        ("fused", &e.fused),
        ("object", &e.object),
        ("attribution", &e.attribution),
        ("texture", &e.texture),
    ] {
        let _ = write!(out, "<tr><td>{name}</td>");
        metric_cells(out, m);
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

fn rules_table(out: &mut String, e: &Evaluation) {
    let Some(rules) = &e.rules else { return };
    out.push_str(
        "<h2>Fusion rules</h2><table><tr><th>map rule / image score</th><th>image AUROC</th>\
         <th>pixel AUROC</th><th>AUPRO@0.3</th><th>AUPRO (ref.)</th><th>detected</th><th>false alarms</th>\
         <th>missed though a branch saw it</th></tr>",
    );
    for r in rules {
        let _ = write!(
            out,
            "<tr><td>{} / {}</td>",
            escape(&r.rule),
            escape(&r.image_score)
        );
        metric_cells(out, &r.metrics);
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            r.detected, r.false_alarms, r.missed_but_seen_by_a_branch
        );
    }
    out.push_str(
        "</table><p class=\"note\">Thresholds: each rule's own quantile of held-out normal scores. \
         \"Missed though a branch saw it\": anomalous images under the rule's threshold that at least \
         one branch alone puts above its own normal-quantile threshold.</p>",
    );
}

fn ablation_table(out: &mut String, e: &Evaluation) {
    let Some(rows) = &e.ablation else { return };
    out.push_str(
        "<h2>Ablation (paper's rule)</h2><table><tr><th>branches</th><th>image AUROC (sum rule)</th>\
         <th>image AUROC of max(M)</th><th>pixel AUROC</th><th>AUPRO@0.3</th></tr>",
    );
    for r in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td></tr>",
            escape(&r.branches),
            r.image_auroc,
            r.map_max_image_auroc,
            r.pixel_auroc,
            r.aupro_0_3
        );
    }
    out.push_str("</table>");
}

fn gallery_section(out: &mut String, gallery: &[(&GalleryItem, String)]) {
    let sections = [
        (
            GalleryKind::FalsePositive,
            "Highest-scoring normal images (worst false positives)",
        ),
        (
            GalleryKind::FalseNegative,
            "Lowest-scoring anomalous images (worst false negatives)",
        ),
        (GalleryKind::Detection, "Detections across the score range"),
    ];
    out.push_str(
        "<h2>Gallery</h2><p class=\"note\">Left: the image with the ground-truth outline (red); \
         right: the fused heatmap over it (colour scale fixed per model).</p>",
    );
    for (kind, heading) in sections {
        let _ = write!(out, "<h3>{heading}</h3><div class=\"gallery\">");
        for (item, src) in gallery.iter().filter(|(i, _)| i.kind == kind) {
            let r = &item.record;
            let name = r
                .image
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let verdict = match r.anomalous {
                Some(true) => "flagged",
                Some(false) => "not flagged",
                None => "no threshold",
            };
            let _ = write!(
                out,
                "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{} ({}) score {:.4}, {verdict}</figcaption></figure>",
                escape(src),
                escape(&name),
                escape(&name),
                escape(r.defect.as_deref().unwrap_or("good")),
                r.fused_score
            );
        }
        out.push_str("</div>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape("a<b>&\"c\""), "a&lt;b&gt;&amp;&quot;c&quot;");
    }
}
