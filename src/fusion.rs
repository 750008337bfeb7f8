//! Fusion of the branches into one anomaly map and one image score.
//!
//! The paper's rule (the reference, [`FusionRule::Paper`]): map
//! `M = M_obj ⊙ M_pc ⊙ M_attr` on the evaluation grid (object and texture
//! maps min-max normalised, the attribution map raw); image score
//! `s = s_pc + λ_obj·s_obj + λ_M·max(M)`, with `max(M)` taken before the
//! final 5×5, σ = 1 smoothing.
//!
//! The product has two failure modes: the branch with the widest dynamic
//! range decides, and one branch that sees nothing suppresses a real anomaly
//! another branch sees clearly. The calibrated rules work on every branch's
//! *surprise* map `S_b` instead (see [`crate::calibration`]: the same scale
//! for every branch, set from held-out normal images), and combine them:
//!
//! - [`FusionRule::CalibratedProduct`]: geometric mean of the `S_b` (all
//!   must agree, as the paper's product, but no branch's units decide);
//! - [`FusionRule::SoftOrAnd`]: `α·mean(S) + (1 − α)·geomean(S)`, so a strong
//!   single-branch response survives neutral branches;
//! - [`FusionRule::TwoOfThree`]: mean of the two largest `S_b`: a soft vote
//!   that needs two branches to agree and ignores the least surprised one,
//!   so one branch can neither raise a false alarm alone nor veto a real
//!   anomaly.
//!
//! Image scores likewise: [`ImageScoreRule::Paper`] is the weighted sum
//! above, whatever the map rule: its `max(M)` is always read from the
//! paper's product map, the map its λ_M was set for (a surprise map has other
//! units), so the map rule changes the localisation map and not the paper's
//! image score. [`ImageScoreRule::Calibrated`] sums robust z-scores of the
//! branches' image scores and of `max(M)` of the rule's own map, with no
//! hand-set λ.
//!
//! Every branch's output is kept, so any subset of branches can be fused the
//! same way (the paper's ablations). A single branch alone is judged by its
//! own score and map.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::anomaly_map::AnomalyMap;
use crate::branch::BranchOutput;
use crate::calibration::{MapCalibration, ScoreCalibration};
use crate::config::FusionConfig;

/// How branch maps are combined into one map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FusionRule {
    /// The paper's product of raw maps (the reference).
    Paper,
    /// Geometric mean of the calibrated surprise maps.
    CalibratedProduct,
    /// `α·mean + (1 − α)·geometric mean` of the surprise maps.
    SoftOrAnd,
    /// Mean of the two largest surprise maps.
    TwoOfThree,
}

impl FusionRule {
    pub const ALL: [FusionRule; 4] = [
        FusionRule::Paper,
        FusionRule::CalibratedProduct,
        FusionRule::SoftOrAnd,
        FusionRule::TwoOfThree,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FusionRule::Paper => "paper",
            FusionRule::CalibratedProduct => "calibrated_product",
            FusionRule::SoftOrAnd => "soft_or_and",
            FusionRule::TwoOfThree => "two_of_three",
        }
    }
}

/// How the image score is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ImageScoreRule {
    /// `s_pc + λ_obj·s_obj + λ_M·max(M)`.
    Paper,
    /// Sum of robust z-scores of the branch scores and of `max(M)`.
    Calibrated,
}

impl ImageScoreRule {
    pub fn name(self) -> &'static str {
        match self {
            ImageScoreRule::Paper => "paper",
            ImageScoreRule::Calibrated => "calibrated",
        }
    }
}

/// What the calibrated rules need, measured on held-out normal images.
#[derive(Debug, Clone, PartialEq)]
pub struct FusionCalibration {
    /// Map value distribution of each branch (object, attribution, texture).
    pub maps: [MapCalibration; 3],
    /// Image score location and scale of each branch.
    pub scores: [ScoreCalibration; 3],
    /// Location and scale of `max(M)` under each rule, in [`FusionRule::ALL`] order.
    pub map_max: [ScoreCalibration; 4],
}

impl FusionCalibration {
    /// Robust z-score of every branch's image score: how unusual each branch
    /// finds the image, on one scale.
    pub fn branch_z(&self, outputs: &BranchOutputs) -> [f64; 3] {
        let mut z = [0.0; 3];
        for (i, b) in Branch::ALL.into_iter().enumerate() {
            z[i] = self.scores[i].z(outputs.get(b).score);
        }
        z
    }
}

/// One of the three branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Branch {
    Object,
    Attribution,
    Texture,
}

impl Branch {
    pub const ALL: [Branch; 3] = [Branch::Object, Branch::Attribution, Branch::Texture];

    pub fn name(self) -> &'static str {
        match self {
            Branch::Object => "object",
            Branch::Attribution => "attribution",
            Branch::Texture => "texture",
        }
    }
}

impl fmt::Display for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A non-empty subset of branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BranchSet(u8);

impl BranchSet {
    pub const ALL: BranchSet = BranchSet(0b111);

    pub fn of(branches: &[Branch]) -> Self {
        Self(branches.iter().fold(0, |acc, &b| acc | Self::bit(b)))
    }

    pub fn contains(self, b: Branch) -> bool {
        self.0 & Self::bit(b) != 0
    }

    pub fn branches(self) -> Vec<Branch> {
        Branch::ALL
            .into_iter()
            .filter(|&b| self.contains(b))
            .collect()
    }

    /// All seven non-empty subsets, singles first, then pairs, then all three.
    pub fn all_subsets() -> Vec<BranchSet> {
        let mut sets: Vec<BranchSet> = (1u8..8).map(BranchSet).collect();
        sets.sort_by_key(|s| (s.0.count_ones(), s.0));
        sets
    }

    fn bit(b: Branch) -> u8 {
        1 << (b as u8)
    }
}

impl fmt::Display for BranchSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.branches().iter().map(|b| b.name()).collect();
        f.write_str(&names.join("+"))
    }
}

/// The three branches' outputs for one image.
#[derive(Debug, Clone)]
pub struct BranchOutputs {
    pub object: BranchOutput,
    pub attribution: BranchOutput,
    pub texture: BranchOutput,
}

impl BranchOutputs {
    pub fn get(&self, b: Branch) -> &BranchOutput {
        match b {
            Branch::Object => &self.object,
            Branch::Attribution => &self.attribution,
            Branch::Texture => &self.texture,
        }
    }
}

/// A fused result.
#[derive(Debug, Clone)]
pub struct Fused {
    pub score: f64,
    /// The fused map after the final smoothing.
    pub map: AnomalyMap,
    /// `max(M)` before the final smoothing.
    pub map_max: f32,
}

/// Fuses the branches of `set` by `rule`, with the image score by
/// `config.image_score`. The calibrated rules and score need `calibration`;
/// without it they fall back to the paper's.
pub fn fuse(
    outputs: &BranchOutputs,
    set: BranchSet,
    rule: FusionRule,
    config: &FusionConfig,
    calibration: Option<&FusionCalibration>,
) -> Fused {
    let (rule, calibration) = match calibration {
        Some(c) => (rule, Some(c)),
        None => (FusionRule::Paper, None),
    };
    let raw = fused_map(outputs, set, rule, config.soft_or_weight, calibration);
    let map_max = raw.max();
    let score = match (config.image_score, calibration) {
        (ImageScoreRule::Calibrated, Some(c)) => calibrated_score(outputs, set, rule, map_max, c),
        _ if rule == FusionRule::Paper => paper_score(outputs, set, map_max, config),
        _ => {
            let product_max = fused_map(outputs, set, FusionRule::Paper, 0.0, None).max();
            paper_score(outputs, set, product_max, config)
        }
    };
    let map = raw.gaussian_blurred_with_kernel(config.final_kernel, config.final_sigma);
    Fused {
        score,
        map,
        map_max,
    }
}

/// The fused map before the final smoothing.
fn fused_map(
    outputs: &BranchOutputs,
    set: BranchSet,
    rule: FusionRule,
    alpha: f64,
    calibration: Option<&FusionCalibration>,
) -> AnomalyMap {
    let branches = set.branches();
    let raw: Vec<&AnomalyMap> = branches.iter().map(|&b| &outputs.get(b).map).collect();
    let Some(cal) = calibration.filter(|_| rule != FusionRule::Paper) else {
        return AnomalyMap::product(&raw);
    };
    let surprise: Vec<Vec<f32>> = branches
        .iter()
        .zip(&raw)
        .map(|(&b, map)| {
            let c = &cal.maps[b as usize];
            map.data.iter().map(|&v| c.surprise(v)).collect()
        })
        .collect();
    let first = raw[0];
    let combine = |values: &mut Vec<f32>| -> f32 {
        match rule {
            FusionRule::Paper | FusionRule::CalibratedProduct => geometric_mean(values),
            FusionRule::SoftOrAnd => {
                let a = alpha as f32;
                a * arithmetic_mean(values) + (1.0 - a) * geometric_mean(values)
            }
            FusionRule::TwoOfThree => {
                values.sort_unstable_by(|x, y| y.total_cmp(x));
                values.truncate(2);
                arithmetic_mean(values)
            }
        }
    };
    let mut scratch = Vec::with_capacity(surprise.len());
    let data = (0..first.data.len())
        .map(|i| {
            scratch.clear();
            scratch.extend(surprise.iter().map(|s| s[i]));
            combine(&mut scratch)
        })
        .collect();
    AnomalyMap::new(first.height, first.width, data)
}

fn arithmetic_mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

/// Geometric mean of non-negative values (0 if any is 0).
fn geometric_mean(values: &[f32]) -> f32 {
    values
        .iter()
        .product::<f32>()
        .powf(1.0 / values.len() as f32)
}

/// `s_pc + λ_obj·s_obj + λ_M·max(M)`, keeping the subset's terms; `map_max`
/// is the maximum of the paper's product map.
fn paper_score(
    outputs: &BranchOutputs,
    set: BranchSet,
    map_max: f32,
    config: &FusionConfig,
) -> f64 {
    let mut score = config.lambda_map * f64::from(map_max);
    if set.contains(Branch::Texture) {
        score += outputs.texture.score;
    }
    if set.contains(Branch::Object) {
        score += config.lambda_obj * outputs.object.score;
    }
    score
}

/// Sum of the subset's branch z-scores and the z-score of `max(M)`.
fn calibrated_score(
    outputs: &BranchOutputs,
    set: BranchSet,
    rule: FusionRule,
    map_max: f32,
    cal: &FusionCalibration,
) -> f64 {
    let z = cal.branch_z(outputs);
    let branches: f64 = set.branches().iter().map(|&b| z[b as usize]).sum();
    let rule_index = FusionRule::ALL.iter().position(|&r| r == rule).unwrap_or(0);
    branches + cal.map_max[rule_index].z(f64::from(map_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(score: f64, map: Vec<f32>) -> BranchOutput {
        BranchOutput {
            score,
            map: AnomalyMap::new(1, map.len(), map),
        }
    }

    fn outputs() -> BranchOutputs {
        BranchOutputs {
            object: output(50.0, vec![1.0, 0.5, 0.0]),
            attribution: output(9.0, vec![2.0, 4.0, 4.0]),
            texture: output(3.0, vec![0.5, 1.0, 1.0]),
        }
    }

    #[test]
    fn paper_rule_on_all_branches() {
        let config = FusionConfig {
            final_sigma: 0.0,
            ..FusionConfig::default()
        };
        let fused = fuse(&outputs(), BranchSet::ALL, FusionRule::Paper, &config, None);
        // Products: 1.0, 2.0, 0.0; max 2.0. Score: 3 + 0.01·50 + 1·2.
        assert_eq!(fused.map.data, vec![1.0, 2.0, 0.0]);
        assert!((fused.score - 5.5).abs() < 1e-12);
    }

    #[test]
    fn subsets_keep_only_their_terms() {
        let config = FusionConfig {
            final_sigma: 0.0,
            ..FusionConfig::default()
        };
        let attr_only = fuse(
            &outputs(),
            BranchSet::of(&[Branch::Attribution]),
            FusionRule::Paper,
            &config,
            None,
        );
        assert!((attr_only.score - 4.0).abs() < 1e-12);
        let obj_tex = fuse(
            &outputs(),
            BranchSet::of(&[Branch::Object, Branch::Texture]),
            FusionRule::Paper,
            &config,
            None,
        );
        // Products 0.5, 0.5, 0.0; score 3 + 0.5 + 0.5.
        assert!((obj_tex.score - 4.0).abs() < 1e-12);
    }

    #[test]
    fn seven_subsets_in_order() {
        let names: Vec<String> = BranchSet::all_subsets()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "object",
                "attribution",
                "texture",
                "object+attribution",
                "object+texture",
                "attribution+texture",
                "object+attribution+texture"
            ]
        );
    }

    /// Calibration where every branch's normal map values are uniform on
    /// [0, 1) and scores have median 0 and scale 1.
    fn uniform_calibration() -> FusionCalibration {
        let table = || {
            let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
            MapCalibration::fit(&mut v)
        };
        let unit = ScoreCalibration {
            median: 0.0,
            scale: 1.0,
        };
        FusionCalibration {
            maps: [table(), table(), table()],
            scores: [unit; 3],
            map_max: [unit; 4],
        }
    }

    fn three_maps(object: f32, attribution: f32, texture: f32) -> BranchOutputs {
        BranchOutputs {
            object: output(1.0, vec![object]),
            attribution: output(2.0, vec![attribution]),
            texture: output(3.0, vec![texture]),
        }
    }

    fn fused_value(o: &BranchOutputs, rule: FusionRule) -> f32 {
        let config = FusionConfig {
            final_sigma: 0.0,
            ..FusionConfig::default()
        };
        fuse(
            o,
            BranchSet::ALL,
            rule,
            &config,
            Some(&uniform_calibration()),
        )
        .map
        .data[0]
    }

    #[test]
    fn a_strong_single_branch_survives_soft_or_but_not_the_product() {
        // One branch at its 99.99th normal percentile, two neutral at the median.
        let lone = three_maps(0.9999, 0.5, 0.5);
        let neutral = three_maps(0.5, 0.5, 0.5);
        let soft = |o| fused_value(o, FusionRule::SoftOrAnd);
        let product = |o| fused_value(o, FusionRule::CalibratedProduct);
        assert!(
            soft(&lone) > 2.0 * soft(&neutral),
            "{} vs {}",
            soft(&lone),
            soft(&neutral)
        );
        assert!(product(&lone) < 4.0 * product(&neutral));
    }

    #[test]
    fn two_of_three_needs_two_branches_and_ignores_a_silent_one() {
        let one = three_maps(0.9999, 0.5, 0.5);
        let two = three_maps(0.9999, 0.9999, 0.0);
        let v1 = fused_value(&one, FusionRule::TwoOfThree);
        let v2 = fused_value(&two, FusionRule::TwoOfThree);
        // Two agreeing branches: mean of two surprises of ln(10^4) ≈ 9.2.
        assert!((v2 - 9.21).abs() < 0.3, "{v2}");
        assert!(v1 < 0.6 * v2, "{v1} vs {v2}");
    }

    #[test]
    fn calibrated_image_score_sums_z_scores() {
        let config = FusionConfig {
            image_score: ImageScoreRule::Calibrated,
            final_sigma: 0.0,
            ..FusionConfig::default()
        };
        let o = three_maps(0.5, 0.5, 0.5);
        let cal = uniform_calibration();
        let f = fuse(
            &o,
            BranchSet::ALL,
            FusionRule::CalibratedProduct,
            &config,
            Some(&cal),
        );
        // z = 1 + 2 + 3 from the branches, plus max(M) ≈ ln 2 (the median's surprise).
        assert!((f.score - (6.0 + 0.693)).abs() < 0.05, "{}", f.score);
    }

    #[test]
    fn paper_image_score_reads_the_product_map_under_every_map_rule() {
        let config = FusionConfig {
            final_sigma: 0.0,
            ..FusionConfig::default()
        };
        let o = three_maps(0.9, 0.8, 0.5);
        let cal = uniform_calibration();
        let paper = fuse(&o, BranchSet::ALL, FusionRule::Paper, &config, Some(&cal));
        // Product map value 0.9 * 0.8 * 0.5 = 0.36 everywhere.
        assert!((paper.map_max - 0.36).abs() < 1e-6, "{}", paper.map_max);
        for rule in [
            FusionRule::CalibratedProduct,
            FusionRule::SoftOrAnd,
            FusionRule::TwoOfThree,
        ] {
            let f = fuse(&o, BranchSet::ALL, rule, &config, Some(&cal));
            // The rule's own map is on the surprise scale, not the product's.
            assert!((f.map_max - paper.map_max).abs() > 0.1, "{rule:?}");
            assert_eq!(f.score, paper.score, "{rule:?}");
        }
    }
}
