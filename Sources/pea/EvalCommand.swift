#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import PEADiffusion

/// `pea eval`'s options, declared once for its parser and its help; each model takes its own subset.
enum EvalOptions {
    static let description = """
Runs one model component of a diffusers folder (the component's folder, or a pipeline root) on tensors
read from a safetensors file and writes its outputs, in float32, to another.

  unet        inputs: sample [B,C,H,W], timestep [B] (any numeric dtype), encoder_hidden_states [B,T,D];
              SDXL also text_embeds [B,P] and time_ids [B,6]; LCM also timestep_cond [B,E].
              output: sample; with --features also down.{i}, mid, up.{i} (each block's output).
  vae-decode  inputs: latents [B,4,h,w] (the decoder's raw input, already divided by scaling_factor).
              output: sample [B,3,8h,8w], unclamped.
  text-encoder  DIR: a text-encoder folder with its tokenizer files, a pipeline's text_encoder/ or
              text_encoder_2/ (its tokenizer/ or tokenizer_2/ beside it), or a pipeline root (text_encoder/).
              output: input_ids [N,L] int64 (padded to the tokenizer's length, 77 for CLIP, or --max-length),
              last_hidden_state [N,L,D], text_embeds [N,P] for encoders with a projection.
  vae-encode  inputs: image [B,3,H,W] in [-1,1].  output: latent_mean, latent_logvar (clamped to [-30, 20]
              as diffusers' DiagonalGaussianDistribution does).
  kd-step     one PEA distillation step through the frozen UNet (DIR: a unet folder or a pipeline root), no
              update. inputs: noisy_latents [B,C,h,w], noise [B,C,h,w] (the task target; a `target` tensor,
              e.g. the velocity for v-prediction, replaces it), timesteps [B], student_states and
              student_states_uncond [B,L,Din] (the language-specific encoder's states, before the adapter),
              teacher_states and teacher_states_uncond [B,L,D] (English encoder), uncond_mask [B] (1 → both
              sides use their uncond states), optional zh_or_not [B] (hybrid: task loss on 1, KD losses on
              0); SDXL also time_ids [B,6] and teacher_text_embeds [B,P].
              output: loss_task, loss_logits, loss_features, loss [1] and grad.<name> for every adapter
              parameter (official names). --feature-weight W (default 0.1) weighs the feature term.
"""
    static let model = CommandOption.value("--model", "DIR", help: "diffusers model folder")
    static let inputs = CommandOption.value("--inputs", "PATH", help: "safetensors file with the inputs named above")
    static let output = CommandOption.value(
        "--output", "PATH", help: "safetensors file to write (replaced atomically; nothing is left on failure)")
    static let variant = CommandOption.value(
        "--variant", "NAME", help: "read diffusion_pytorch_model.NAME.safetensors when present (e.g. fp16)")
    static let features = CommandOption.flag("--features", help: "(unet) also write every block's output")
    static let unet = CommandOption.value(
        "--unet", "DIR", help: "(kd-step) the frozen UNet and the adapter checkpoint (safetensors or .bin)",
        label: "--unet DIR, --adapter PATH")
    static let adapter = CommandOption.value("--adapter", "PATH", help: nil)   // in --unet's row
    static let prompt = CommandOption.repeatable("--prompt", "TEXT", help: "(text-encoder) a prompt to encode (repeatable)")
    static let maxLength = CommandOption.value(
        "--max-length", "N", help: "(text-encoder) the token length (default: the tokenizer's)")
    static let featureWeight = CommandOption.value(
        "--feature-weight", "W", default: "0.1", help: "(kd-step) weight of the feature term")

    /// What each model accepts.
    static let options: [String: [CommandOption]] = [
        "unet": [model, inputs, output, variant, features] + BackendOptions.inference,
        "vae-decode": [model, inputs, output, variant] + BackendOptions.inference,
        "vae-encode": [model, inputs, output, variant] + BackendOptions.inference,
        "text-encoder": [model, prompt, maxLength, output, variant] + BackendOptions.inference,
        "kd-step": [unet, adapter, inputs, output, featureWeight] + BackendOptions.all,
    ]
    static let models = ["unet", "vae-decode", "vae-encode", "text-encoder", "kd-step"]

    static let spec = CommandSpec(
        name: "eval",
        usage: ["pea eval unet       --model DIR --inputs IN.safetensors --output OUT.safetensors [--features]",
                "pea eval vae-decode --model DIR --inputs IN.safetensors --output OUT.safetensors",
                "pea eval vae-encode --model DIR --inputs IN.safetensors --output OUT.safetensors",
                "pea eval text-encoder --model DIR --prompt TEXT [--prompt TEXT …] [--max-length N] --output OUT.safetensors",
                "pea eval kd-step    --unet DIR --adapter PATH --inputs IN.safetensors --output OUT.safetensors"],
        description: description,
        groups: [.init("Options", [model, inputs, output, variant, features, unet, adapter, prompt, maxLength, featureWeight]
                                  + BackendOptions.inference)])
}

func runEval(_ arguments: [String]) throws {
    typealias O = EvalOptions
    guard let what = arguments.first, !what.hasPrefix("-") else {
        if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
        throw PEAError.usage("eval: which model? (unet, vae-decode, vae-encode, text-encoder; see 'pea eval --help')")
    }
    if CommandSpec.asksForHelp(arguments) { print(O.spec.help); return }
    guard let accepted = O.options[what] else {
        throw PEAError.usage("eval: unknown model '\(what)' (\(O.models.joined(separator: ", ")))")
    }
    let options = try ParsedOptions(Array(arguments.dropFirst()), command: "eval \(what)", options: accepted)
    if what == "kd-step" {
        try runEvalKDStep(options)
        return
    }
    let model = try options.string(O.model)
    let output = try options.string(O.output)
    if what == "text-encoder" {
        try runEvalTextEncoder(options, model: model, output: output)
        return
    }
    let inputs = try InputTensors(path: options.string(O.inputs))
    let variant = try options.optionalString(O.variant)
    let selection = try BackendOptions.select(options)
    let backend = selection.backend, dtype = selection.dtype

    var results: [(name: String, tensor: Tensor)] = []
    switch what {
    case "unet":
        let (unet, _) = try UNet2DConditionModel.load(folder: model, backend: backend, variant: variant, dtype: dtype)
        let unetInputs = DenoisingInputs(
            sample: try inputs.tensor("sample", on: backend), timestep: try inputs.tensor("timestep", on: backend, floatOnly: false),
            encoderHiddenStates: try inputs.tensor("encoder_hidden_states", on: backend),
            textEmbeds: try inputs.optionalTensor("text_embeds", on: backend),
            timeIds: try inputs.optionalTensor("time_ids", on: backend, floatOnly: false),
            timestepCondition: try inputs.optionalTensor("timestep_cond", on: backend))
        let (sample, features) = try unet.evaluate(unetInputs, keepFeatures: options.has(O.features))
        results.append(("sample", sample))
        for (i, h) in features.down.enumerated() { results.append(("down.\(i)", h)) }
        if let mid = features.mid { results.append(("mid", mid)) }
        for (i, h) in features.up.enumerated() { results.append(("up.\(i)", h)) }
    case "vae-decode":
        let (vae, _) = try AutoencoderKL.load(folder: model, backend: backend, variant: variant, dtype: dtype)
        results.append(("sample", try vae.decode(inputs.tensor("latents", on: backend))))
    default:
        let (vae, _) = try AutoencoderKL.load(folder: model, backend: backend, variant: variant, dtype: dtype)
        let (mean, logvar) = try vae.encode(inputs.tensor("image", on: backend))
        results.append(("latent_mean", mean))
        results.append(("latent_logvar", logvar))
    }

    var host = try results.map { (name: $0.name, tensor: try backend.download($0.tensor).converted(to: .f32)) }
    if let i = host.firstIndex(where: { $0.name == "latent_logvar" }) {
        let clamped = host[i].tensor.floats().map { min(max($0, -30), 20) }
        host[i].tensor = HostTensor(clamped, shape: host[i].tensor.shape)
    }
    try SafeTensorsWriter.write(host, metadata: ["pea": "eval \(what)"], to: output)
    print(output)
}

/// `pea eval text-encoder` for CLIP text encoders (CLIPTextModel, CLIPTextModelWithProjection).
func runEvalTextEncoder(_ options: ParsedOptions, model: String, output: String) throws {
    let prompts = options.strings(EvalOptions.prompt)
    guard !prompts.isEmpty else { throw PEAError.usage("eval text-encoder: give at least one --prompt") }
    let maxLength = try options.optionalInt(EvalOptions.maxLength)
    if let maxLength, maxLength < 2 { throw PEAError.usage("eval text-encoder: --max-length must be at least 2") }
    let selection = try BackendOptions.select(options)
    let backend = selection.backend, dtype = selection.dtype
    let encoderFolder = try ModelFolder.component(model, "text_encoder")
    let config = try ConfigFile(path: joinPath(encoderFolder, "config.json"))
    let modelType = try config.optionalString("model_type") ?? ""
    guard modelType.hasPrefix("clip") else {
        try naming(EvalOptions.maxLength, in: options, when: maxLength != nil) {
            try runEvalLanguageEncoder(model, prompts: prompts, maxLength: maxLength, backend: backend, dtype: dtype, output: output)
        }
        return
    }
    let tokenizer = try CLIPTokenizer(folder: textEncoderFolders(model).tokenizer)
    let encoder = try CLIPTextModel.load(folder: encoderFolder, backend: backend, dtype: dtype).model
    let length = maxLength ?? min(tokenizer.modelMaxLength, encoder.config.maxPositions)
    guard length <= encoder.config.maxPositions else {
        throw PEAError.usage("eval text-encoder: --max-length \(length) exceeds the encoder's \(encoder.config.maxPositions) positions")
    }
    var ids: [Int] = []
    for prompt in prompts {
        let encoded = tokenizer(prompt, maxLength: length)
        if let cut = encoded.truncatedText { printWarning("prompt truncated to \(length) tokens; cut: \(cut)") }
        ids += encoded.ids
    }
    let idTensor = HostTensor(ids: ids, shape: [prompts.count, length], dtype: .i64)
    let result = try encoder(ids: idTensor)
    var tensors: [(name: String, tensor: HostTensor)] = [("input_ids", idTensor),
                                                         ("last_hidden_state", try backend.download(result.lastHiddenState).converted(to: .f32))]
    if let embeds = result.textEmbeds { tensors.append(("text_embeds", try backend.download(embeds).converted(to: .f32))) }
    try SafeTensorsWriter.write(tensors, metadata: ["pea": "eval text-encoder"], to: output)
    print(output)
}

/// `pea eval text-encoder` for PEA's language-specific encoders: Chinese-CLIP (WordPiece + BERT, 52 tokens)
/// and multilingual CLIP's XLM-R (SentencePiece + XLM-R, 77 tokens), which use an attention mask.
func runEvalLanguageEncoder(_ folder: String, prompts: [String], maxLength: Int?, backend: any ComputeBackend, dtype: DType = .f32,
                            output: String) throws {
    let directory = try ModelFolder.component(folder, "text_encoder")
    let config = try BertTextConfig(ConfigFile(path: joinPath(directory, "config.json")))
    func run<T>(_ encoder: TokenizedTextEncoder<T>) throws -> [(name: String, tensor: HostTensor)] {
        let (ids, mask, truncated) = encoder.tokenize(prompts)
        for cut in truncated.compactMap({ $0 }) { printWarning("prompt truncated to \(encoder.maxLength) tokens; cut: \(cut)") }
        let states = try encoder.encode(prompts, warn: { _ in })
        return [("input_ids", ids), ("attention_mask", mask), ("last_hidden_state", try backend.download(states).converted(to: .f32))]
    }
    let tensors: [(name: String, tensor: HostTensor)]
    if case .paddingAware = config.positionIDs {
        tensors = try run(LanguageEncoders.xlmRoberta(folder: folder, backend: backend, maxLength: maxLength ?? LanguageEncoders.xlmRobertaMaxLength, dtype: dtype))
    } else {
        tensors = try run(LanguageEncoders.chineseCLIP(folder: folder, backend: backend, maxLength: maxLength ?? LanguageEncoders.chineseCLIPMaxLength, dtype: dtype))
    }
    try SafeTensorsWriter.write(tensors, metadata: ["pea": "eval text-encoder"], to: output)
    print(output)
}

/// The encoder's folder and its tokenizer's: DIR itself when it holds the tokenizer files, a pipeline's
/// text_encoder[_N]/ with tokenizer[_N]/ beside it, or a pipeline root's text_encoder/ and tokenizer/.
func textEncoderFolders(_ folder: String) throws -> (encoder: String, tokenizer: String) {
    func has(_ path: String) -> Bool { access(path, F_OK) == 0 }
    let tokenizerFiles = ["vocab.json", "tokenizer.json", "vocab.txt", "sentencepiece.bpe.model"]
    if has(joinPath(folder, "model_index.json")) {
        return (joinPath(folder, "text_encoder"), joinPath(folder, "tokenizer"))
    }
    guard has(joinPath(folder, "config.json")) else {
        throw PEAError.invalidFile(path: folder, reason: "not a text-encoder folder (no config.json) nor a pipeline folder (no model_index.json)")
    }
    if tokenizerFiles.contains(where: { has(joinPath(folder, $0)) }) { return (folder, folder) }
    let trimmed = folder.hasSuffix("/") ? String(folder.dropLast()) : folder
    let name = trimmed.split(separator: "/").last.map(String.init) ?? trimmed
    if name.hasPrefix("text_encoder") {
        let sibling = String(trimmed.dropLast(name.count)) + name.replacingPrefix("text_encoder", with: "tokenizer")
        if has(sibling) { return (folder, sibling) }
    }
    throw PEAError.invalidFile(path: folder, reason: "no tokenizer files here (\(tokenizerFiles.joined(separator: ", "))) nor a sibling tokenizer folder")
}

extension String {
    func replacingPrefix(_ prefix: String, with replacement: String) -> String {
        hasPrefix(prefix) ? replacement + dropFirst(prefix.count) : self
    }
}

/// `pea eval kd-step`: one distillation step's losses and adapter gradients (no update), in f32.
func runEvalKDStep(_ options: ParsedOptions) throws {
    typealias O = EvalOptions
    let output = try options.string(O.output)
    let inputs = try options.string(O.inputs)
    let selection = try BackendOptions.select(options)
    guard selection.dtype == .f32 else {
        throw PEAError.usage("eval kd-step: gradients are computed in fp32; drop --precision")
    }
    let featureWeight = try options.double(O.featureWeight)
    let backend = selection.backend
    let unet = try UNet2DConditionModel.load(folder: options.string(O.unet), backend: backend).model
    let adapter = try PEAAdapter.load(path: options.string(O.adapter), backend: backend)
    let batch = try DistillationBatch.load(path: inputs, backend: backend)
    let (losses, gradients) = try KnowledgeDistillation(unet: unet, featureWeight: Float(featureWeight)).step(adapter: adapter, batch: batch)
    var tensors: [(name: String, tensor: HostTensor)] = [
        ("loss_task", HostTensor([losses.task], shape: [1])), ("loss_logits", HostTensor([losses.logits], shape: [1])),
        ("loss_features", HostTensor([losses.features], shape: [1])), ("loss", HostTensor([losses.total], shape: [1])),
    ]
    for (name, _) in adapter.namedParameters {
        tensors.append(("grad.\(name)", try backend.download(gradients[name]!)))
    }
    try SafeTensorsWriter.write(tensors, metadata: ["pea": "eval kd-step"], to: output)
    print(output)
}
