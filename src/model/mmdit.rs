//! The SD3-family MMDiT (`SD3Transformer2DModel` in diffusers): joint image–text attention blocks,
//! MMDiT-X dual attention (SD3.5-Medium) and qk RMS-norm (SD3.5). Weight names are diffusers' own, so the
//! layout of a checkpoint can be read off the `format!` calls below.

use super::block::{Builder, JointBlock, NORM_EPS};
use super::config::TransformerConfig;
use super::linear::{Linear, Param, Trainable, Weights};
use super::nn::{layer_norm_no_affine, modulate};
use super::weights::WeightStore;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};

/// Gradients of trainable vars, by the var's tensor id ([`MMDiT::checkpointed_backward`]).
pub type VarGrads = std::collections::HashMap<candle_core::TensorId, Tensor>;

/// Batch size and latent size of a forward, from the stem to the head.
#[derive(Debug, Clone, Copy)]
struct Grid {
    bsz: usize,
    h: usize,
    wd: usize,
}

/// The SD3 / SD3.5 transformer.
#[derive(Debug, Clone)]
pub struct MMDiT {
    pub cfg: TransformerConfig,
    dtype: DType,
    patch_proj: Linear,
    pos_embed: Tensor,
    t_lin1: Linear,
    t_lin2: Linear,
    y_lin1: Linear,
    y_lin2: Linear,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl MMDiT {
    /// Build from diffusers-named tensors; every missing, unexpected or misshapen tensor is reported.
    pub fn new(
        cfg: &TransformerConfig,
        mut w: WeightStore,
        trainable: &Trainable,
        dtype: DType,
    ) -> Result<Self> {
        cfg.check()?;
        let dev = w.device();
        let seed = match trainable {
            Trainable::Lora { seed, .. } => *seed,
            _ => 0,
        };
        let mut b = Builder {
            w: &mut w,
            trainable,
            rng: super::lora::rng(seed),
            dev: dev.clone(),
            dtype,
        };
        let d = cfg.inner_dim();
        let p = cfg.patch_size;
        // The patch embedding is a p×p stride-p convolution; stored as [D, C, p, p], used as [D, C·p·p].
        let conv =
            b.w.take("pos_embed.proj.weight", &[d, cfg.in_channels, p, p])?;
        let patch_proj = Linear {
            name: "pos_embed.proj".into(),
            weight: Param::new(
                conv.reshape((d, cfg.in_channels * p * p))?,
                matches!(trainable, Trainable::Full),
            )?,
            bias: Some(b.param("pos_embed.proj.bias", &[d])?),
            lora: None,
        };
        let n = cfg.pos_embed_max_size;
        let pos_embed = b.w.take("pos_embed.pos_embed", &[1, n * n, d])?;
        let tt = "time_text_embed";
        let t_lin1 = b.linear(&format!("{tt}.timestep_embedder.linear_1"), 256, d)?;
        let t_lin2 = b.linear(&format!("{tt}.timestep_embedder.linear_2"), d, d)?;
        let y_lin1 = b.linear(
            &format!("{tt}.text_embedder.linear_1"),
            cfg.pooled_projection_dim,
            d,
        )?;
        let y_lin2 = b.linear(&format!("{tt}.text_embedder.linear_2"), d, d)?;
        let context_embedder = b.linear(
            "context_embedder",
            cfg.joint_attention_dim,
            cfg.caption_projection_dim,
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| JointBlock::new(&mut b, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm_out = b.linear("norm_out.linear", d, 2 * d)?;
        let proj_out = b.linear("proj_out", d, p * p * cfg.out_channels)?;
        w.finish()?;
        if let Trainable::Lora { spec, .. } = trainable {
            let names = cfg.linear_shapes();
            if !names.iter().any(|(n, _, _)| spec.targets_module(n)) {
                anyhow::bail!(
                    "lora.targets = {:?} match no linear layer of this model (names are diffusers module \
                     names or suffixes such as \"attn.to_q\"; e.g. {})",
                    spec.targets,
                    names.iter().skip(6).take(4).map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            dtype,
            patch_proj,
            pos_embed,
            t_lin1,
            t_lin2,
            y_lin1,
            y_lin2,
            context_embedder,
            blocks,
            norm_out,
            proj_out,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Velocity prediction.
    /// - `x`: latents `[B, C, H, W]`; `t`: timesteps `[B]` in `[0, 1000]`;
    /// - `context`: `[B, L, joint_attention_dim]`; `pooled`: `[B, pooled_projection_dim]`.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        w: Weights,
    ) -> Result<Tensor> {
        let (mut img, mut ctx, temb_act, grid) = self.stem(x, t, context, pooled, w)?;
        for block in &self.blocks {
            let (xi, ci) = block.forward(&img, &ctx, &temb_act, w)?;
            img = xi;
            if let Some(ci) = ci {
                ctx = ci;
            }
        }
        self.head(&img, &temb_act, grid, w)
    }

    /// Gradient checkpointing: the gradients of `Σ grad_out ⊙ forward(x, t, context, pooled)` with
    /// respect to the trainable weights (`Weights::Policy`), with the activation memory of one
    /// block instead of the whole network. The blocks run forward without a graph, keeping only
    /// each block's inputs; then, from the last block to the first, each block is run again with a
    /// graph from its saved inputs and differentiated against the gradient that flows into its
    /// outputs, which gives its weights' gradients and the gradient for the block before it. Costs
    /// one more forward of the blocks. Returns each trainable var's gradient by tensor id, the
    /// gradient of one backward through `forward` (up to summation order). Each piece's gradient
    /// store is reduced to the trainable vars at once ([`Self::trainable_grads`]).
    pub fn checkpointed_backward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        grad_out: &Tensor,
    ) -> Result<VarGrads> {
        let (img0, ctx0, temb, grid) = self.stem(x, t, context, pooled, Weights::Policy)?;
        let temb_d = temb.detach();
        let mut saved = Vec::with_capacity(self.blocks.len());
        let (mut img, mut ctx) = (img0.detach(), ctx0.detach());
        for block in &self.blocks {
            let (xi, ci) = block.forward(&img, &ctx, &temb_d, Weights::PolicyNoGrad)?;
            let next_ctx = ci.unwrap_or_else(|| ctx.clone());
            saved.push((
                std::mem::replace(&mut img, xi),
                std::mem::replace(&mut ctx, next_ctx),
            ));
        }
        // Gradients flowing between pieces, and their sums, in f32 (f64 for an f64 model).
        let acc = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        // Take a leaf's gradient out of a store, zeros when it had none.
        let take = |g: &mut candle_core::backprop::GradStore, leaf: &Var| -> Result<Tensor> {
            Ok(match g.remove(leaf.as_tensor()) {
                Some(t) => t.to_dtype(acc)?,
                None => leaf.as_tensor().zeros_like()?.to_dtype(acc)?,
            })
        };
        let dot = |a: &Tensor, g: &Tensor| -> Result<Tensor> {
            Ok((a * g.to_dtype(a.dtype())?)?.sum_all()?.to_dtype(acc)?)
        };
        let mut grads = VarGrads::new();
        let mut keep = |g: candle_core::backprop::GradStore| -> Result<()> {
            for (id, t) in self.trainable_grads(&g) {
                let sum = match grads.remove(&id) {
                    Some(s) => (s + t)?,
                    None => t,
                };
                grads.insert(id, sum);
            }
            Ok(())
        };
        let leaf_img = Var::from_tensor(&img)?;
        let leaf_t = Var::from_tensor(&temb_d)?;
        let out = self.head(
            leaf_img.as_tensor(),
            leaf_t.as_tensor(),
            grid,
            Weights::Policy,
        )?;
        let mut g = dot(&out, grad_out)?.backward()?;
        let mut g_img = take(&mut g, &leaf_img)?;
        let mut g_t = take(&mut g, &leaf_t)?;
        // The head reads no context tokens.
        let mut g_ctx = ctx.zeros_like()?.to_dtype(acc)?;
        keep(g)?;
        for (block, (bi, bc)) in self.blocks.iter().zip(saved).rev() {
            let (li, lc, lt) = (
                Var::from_tensor(&bi)?,
                Var::from_tensor(&bc)?,
                Var::from_tensor(&temb_d)?,
            );
            let (xi, ci) = block.forward(
                li.as_tensor(),
                lc.as_tensor(),
                lt.as_tensor(),
                Weights::Policy,
            )?;
            let mut s = dot(&xi, &g_img)?;
            if let Some(ci) = &ci {
                s = (s + dot(ci, &g_ctx)?)?;
            }
            let mut g = s.backward()?;
            g_img = take(&mut g, &li)?;
            // A block without a context output passes its context input on unchanged.
            g_ctx = match ci {
                Some(_) => take(&mut g, &lc)?,
                None => (take(&mut g, &lc)? + g_ctx)?,
            };
            g_t = (g_t + take(&mut g, &lt)?)?;
            keep(g)?;
        }
        let s = ((dot(&img0, &g_img)? + dot(&ctx0, &g_ctx)?)? + dot(&temb, &g_t)?)?;
        keep(s.backward()?)?;
        Ok(grads)
    }

    /// The trainable vars' gradients out of a backward's store. Keep these rather than the store:
    /// Candle's store also holds gradients of tensors the graph reached that are not trained, views
    /// that keep the whole pass's activations alive (measured: one image's 1.9 GB, SD3.5-M layers).
    pub fn trainable_grads(&self, g: &candle_core::backprop::GradStore) -> VarGrads {
        self.trainable_vars()
            .into_iter()
            .filter_map(|(_, v)| Some((v.id(), g.get(v.as_tensor())?.detach())))
            .collect()
    }

    /// Patch embedding, timestep and pooled-text embedding, context embedding: the blocks' inputs
    /// `(image tokens, context tokens, silu(temb))` and the latent geometry for [`Self::head`].
    fn stem(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        w: Weights,
    ) -> Result<(Tensor, Tensor, Tensor, Grid)> {
        let (bsz, c, h, wd) = x.dims4()?;
        self.check_inputs(x, t, context, pooled)?;
        let p = self.cfg.patch_size;
        if h % p != 0 || wd % p != 0 {
            anyhow::bail!("latent size {h}×{wd} is not divisible by the patch size {p}");
        }
        let (gh, gw) = (h / p, wd / p);
        let n = self.cfg.pos_embed_max_size;
        if gh > n || gw > n {
            anyhow::bail!("latent grid {gh}×{gw} exceeds pos_embed_max_size = {n}");
        }
        let x = x.to_dtype(self.dtype)?;
        // Patchify: [B, C, gh, p, gw, p] → [B, gh·gw, C·p·p], channel-major like the conv kernel.
        let patches = x
            .reshape((bsz, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((bsz, gh * gw, c * p * p))?;
        let mut img = self.patch_proj.forward(&patches, w)?;
        let (top, left) = ((n - gh) / 2, (n - gw) / 2);
        let pos = self
            .pos_embed
            .reshape((n, n, ()))?
            .narrow(0, top, gh)?
            .narrow(1, left, gw)?
            .reshape((1, gh * gw, ()))?
            .to_dtype(self.dtype)?;
        img = img.broadcast_add(&pos)?;

        let temb = self.t_lin2.forward(
            &self
                .t_lin1
                .forward(&timestep_embedding(t, 256)?.to_dtype(self.dtype)?, w)?
                .silu()?,
            w,
        )?;
        let yemb = self.y_lin2.forward(
            &self
                .y_lin1
                .forward(&pooled.to_dtype(self.dtype)?, w)?
                .silu()?,
            w,
        )?;
        let temb_act = (temb + yemb)?.silu()?;
        let ctx = self
            .context_embedder
            .forward(&context.to_dtype(self.dtype)?, w)?;
        Ok((img, ctx, temb_act, Grid { bsz, h, wd }))
    }

    /// Final adaLN, projection and unpatchify: image tokens → velocity `[B, C_out, H, W]`.
    fn head(&self, img: &Tensor, temb_act: &Tensor, grid: Grid, w: Weights) -> Result<Tensor> {
        let Grid { bsz, h, wd } = grid;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, wd / p);
        let s = self.norm_out.forward(temb_act, w)?.chunk(2, 1)?;
        let img = modulate(&layer_norm_no_affine(img, NORM_EPS)?, &s[1], &s[0])?;
        let out = self.proj_out.forward(&img, w)?; // [B, gh·gw, p·p·C_out]
        let co = self.cfg.out_channels;
        Ok(out
            .reshape((bsz, gh, gw, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((bsz, co, h, wd))?)
    }

    /// Shape errors in the caller's terms rather than a matmul mismatch deep inside.
    fn check_inputs(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> Result<()> {
        let c = &self.cfg;
        let b = x.dim(0)?;
        let ok = x.dim(1)? == c.in_channels
            && t.dims() == [b]
            && context.rank() == 3
            && context.dim(0)? == b
            && context.dim(2)? == c.joint_attention_dim
            && pooled.dims() == [b, c.pooled_projection_dim];
        if !ok {
            anyhow::bail!(
                "transformer inputs have the wrong shapes: latents {:?} (expected [B, {}, H, W]), \
                 timesteps {:?} (expected [B]), context {:?} (expected [B, L, {}]), pooled {:?} \
                 (expected [B, {}])",
                x.dims(),
                c.in_channels,
                t.dims(),
                context.dims(),
                c.joint_attention_dim,
                pooled.dims(),
                c.pooled_projection_dim
            );
        }
        Ok(())
    }

    /// Every linear layer, in checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![
            &self.patch_proj,
            &self.t_lin1,
            &self.t_lin2,
            &self.y_lin1,
            &self.y_lin2,
            &self.context_embedder,
        ];
        for b in &self.blocks {
            v.extend(b.linears());
        }
        v.extend([&self.norm_out, &self.proj_out]);
        v
    }

    /// Every parameter by diffusers name (the patch projection reported as its 2-D matrix).
    pub fn params(&self) -> Vec<(String, &Param)> {
        let mut v: Vec<(String, &Param)> = self.linears().iter().flat_map(|l| l.params()).collect();
        for (i, b) in self.blocks.iter().enumerate() {
            v.extend(b.attn.norm_params(&format!("transformer_blocks.{i}.attn")));
            if let Some(a) = &b.attn2 {
                v.extend(a.norm_params(&format!("transformer_blocks.{i}.attn2")));
            }
        }
        v
    }

    /// Every tensor under its diffusers name with its current value (trained values for trained
    /// tensors; adapters are not merged), in the layout `from_pretrained` reads.
    pub fn state_dict(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = std::collections::HashMap::new();
        let (d, c, p) = (
            self.cfg.inner_dim(),
            self.cfg.in_channels,
            self.cfg.patch_size,
        );
        for (name, param) in self.params() {
            let t = param.value().detach();
            let t = if name == "pos_embed.proj.weight" {
                t.reshape((d, c, p, p))?
            } else {
                t
            };
            out.insert(name, t);
        }
        out.insert("pos_embed.pos_embed".into(), self.pos_embed.clone());
        Ok(out)
    }

    /// As [`MMDiT::state_dict`] with every adapter merged into its base weight
    /// (`W + scale·B·A`): the plain transformer a LoRA run amounts to.
    pub fn merged_state_dict(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        let mut out = self.state_dict()?;
        for l in self.linears() {
            if let Some(ad) = &l.lora {
                let name = format!("{}.weight", l.name);
                let w = out
                    .get(&name)
                    .ok_or_else(|| anyhow::anyhow!("no base weight {name} to merge into"))?;
                let merged = (w.to_dtype(DType::F32)? + ad.delta()?.to_dtype(DType::F32)?)?;
                out.insert(name, merged);
            }
        }
        Ok(out)
    }

    /// Trainable tensors with their names: LoRA adapters under peft's names
    /// (`<module>.lora_A.weight`), fully trained tensors under their own.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![];
        for l in self.linears() {
            if let Some(a) = &l.lora {
                v.push((format!("{}.lora_A.weight", l.name), a.a.clone()));
                v.push((format!("{}.lora_B.weight", l.name), a.b.clone()));
            }
        }
        for (n, p) in self.params() {
            if let Some(var) = p.var() {
                v.push((n, var.clone()));
            }
        }
        v
    }

    /// Number of base parameters (frozen or trained, excluding adapters and the position buffer).
    pub fn num_base_params(&self) -> usize {
        self.params().iter().map(|(_, p)| p.elem_count()).sum()
    }

    /// Load adapter values (from a peft or diffusers LoRA file) into this model's adapters.
    pub fn set_lora(
        &self,
        modules: &std::collections::HashMap<String, (Tensor, Tensor)>,
    ) -> Result<()> {
        let mut seen = 0;
        for l in self.linears() {
            if let Some(ad) = &l.lora {
                let (a, b) = modules.get(&l.name).ok_or_else(|| {
                    anyhow::anyhow!("the LoRA file has no weights for module {}", l.name)
                })?;
                if a.dims() != ad.a.as_tensor().dims() || b.dims() != ad.b.as_tensor().dims() {
                    anyhow::bail!(
                        "LoRA for {}: expected A {:?} and B {:?}, found {:?} and {:?} \
                         (was it trained for another base model?)",
                        l.name,
                        ad.a.as_tensor().dims(),
                        ad.b.as_tensor().dims(),
                        a.dims(),
                        b.dims()
                    );
                }
                ad.a.set(&a.to_dtype(ad.a.dtype())?.to_device(ad.a.device())?)?;
                ad.b.set(&b.to_dtype(ad.b.dtype())?.to_device(ad.b.device())?)?;
                seen += 1;
            }
        }
        if seen != modules.len() {
            let have: std::collections::HashSet<&str> = self
                .linears()
                .iter()
                .filter(|l| l.lora.is_some())
                .map(|l| l.name.as_str())
                .collect();
            let extra: Vec<&String> = modules
                .keys()
                .filter(|k| !have.contains(k.as_str()))
                .collect();
            anyhow::bail!("the LoRA file adapts modules this model has no adapter for: {extra:?}");
        }
        Ok(())
    }
}

/// Sinusoidal timestep features as diffusers' `Timesteps(256, flip_sin_to_cos=True, shift=0)`:
/// `[cos(t·f), sin(t·f)]` with `f_i = exp(−ln(10000)·i/half)`.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    // Computed in f32 step by step as diffusers does: with t up to 1000, one ulp of a frequency moves
    // the phase by ~5e-5, which is visible at the output.
    let neg_ln = -(10000f32.ln());
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_ln * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?)
}

/// The 2-D sin-cos position table of diffusers' `PatchEmbed` (`[1, n·n, dim]`), for building a model
/// from scratch; checkpoints carry it as `pos_embed.pos_embed`.
pub fn sincos_pos_embed(dim: usize, n: usize, base_size: usize, dev: &Device) -> Result<Tensor> {
    let scale = n as f64 / base_size as f64;
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(n * n * dim);
    for row in 0..n {
        for col in 0..n {
            // First half encodes the column (w) coordinate, second half the row, as diffusers does.
            for pos in [col as f64 / scale, row as f64 / scale] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, n * n, dim), dev)?)
}
