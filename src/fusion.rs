//! Fusion of the branches into one anomaly map and one image score.
//!
//! Map: `M = M_obj ⊙ M_pc ⊙ M_attr` on the evaluation grid (object and texture
//! maps min-max normalised, the attribution map raw), then a small Gaussian
//! (5×5, σ = 1). Image score: `s = s_pc + λ_obj·s_obj + λ_M·max(M)`, with
//! `max(M)` taken before the final smoothing.
//!
//! Every branch's output is kept, so any subset of branches can be fused the
//! same way: the product runs over the subset's maps and the score keeps the
//! subset's terms (the paper's ablations). A single branch alone is judged
//! by its own score and map.

use std::fmt;

use crate::anomaly_map::AnomalyMap;
use crate::branch::BranchOutput;
use crate::config::FusionConfig;

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

/// Fuses the branches of `set` by the paper's product rule.
pub fn fuse(outputs: &BranchOutputs, set: BranchSet, config: &FusionConfig) -> Fused {
    let maps: Vec<&AnomalyMap> = set
        .branches()
        .iter()
        .map(|&b| &outputs.get(b).map)
        .collect();
    let product = AnomalyMap::product(&maps);
    let map_max = product.max();
    let mut score = config.lambda_map * f64::from(map_max);
    if set.contains(Branch::Texture) {
        score += outputs.texture.score;
    }
    if set.contains(Branch::Object) {
        score += config.lambda_obj * outputs.object.score;
    }
    let map = product.gaussian_blurred_with_kernel(config.final_kernel, config.final_sigma);
    Fused {
        score,
        map,
        map_max,
    }
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
        let fused = fuse(&outputs(), BranchSet::ALL, &config);
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
        let attr_only = fuse(&outputs(), BranchSet::of(&[Branch::Attribution]), &config);
        assert!((attr_only.score - 4.0).abs() < 1e-12);
        let obj_tex = fuse(
            &outputs(),
            BranchSet::of(&[Branch::Object, Branch::Texture]),
            &config,
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
}
