import PEADiffusion

let evalUsage = """
Usage:
  pea eval unet       --model DIR --inputs IN.safetensors --output OUT.safetensors [--features]
  pea eval vae-decode --model DIR --inputs IN.safetensors --output OUT.safetensors
  pea eval vae-encode --model DIR --inputs IN.safetensors --output OUT.safetensors

Runs one model component of a diffusers folder (the component's folder, or a pipeline root) on tensors
read from a safetensors file and writes its outputs, in float32, to another.

  unet        inputs: sample [B,C,H,W], timestep [B] (any numeric dtype), encoder_hidden_states [B,T,D];
              SDXL also text_embeds [B,P] and time_ids [B,6]; LCM also timestep_cond [B,E].
              output: sample; with --features also down.{i}, mid, up.{i} (each block's output).
  vae-decode  inputs: latents [B,4,h,w] (the decoder's raw input, already divided by scaling_factor).
              output: sample [B,3,8h,8w], unclamped.
  vae-encode  inputs: image [B,3,H,W] in [-1,1].  output: latent_mean, latent_logvar (clamped to [-30, 20]
              as diffusers' DiagonalGaussianDistribution does).

Options:
  --model DIR               diffusers model folder
  --inputs PATH             safetensors file with the inputs named above
  --output PATH             safetensors file to write (replaced atomically; nothing is left on failure)
  --variant NAME            read diffusion_pytorch_model.NAME.safetensors when present (e.g. fp16)
  --features                (unet) also write every block's output
\(BackendOptions.help)
"""

func runEval(_ arguments: [String]) throws {
    guard let what = arguments.first, !what.hasPrefix("-") else {
        if arguments.contains("--help") || arguments.contains("-h") { print(evalUsage); return }
        throw PEAError.usage("eval: which model? (unet, vae-decode, vae-encode; see 'pea eval --help')")
    }
    if arguments.contains("--help") || arguments.contains("-h") { print(evalUsage); return }
    var spec = BackendOptions.spec
    for key in ["--model", "--inputs", "--output", "--variant"] { spec[key] = .value }
    if what == "unet" { spec["--features"] = .flag }
    let command = "eval \(what)"
    let options = try Arguments(Array(arguments.dropFirst()), command: command, spec: spec)
    guard ["unet", "vae-decode", "vae-encode"].contains(what) else {
        throw PEAError.usage("eval: unknown model '\(what)' (unet, vae-decode, vae-encode)")
    }
    let model = try options.requiredString("--model")
    let inputs = try EvalInputs(path: options.requiredString("--inputs"))
    let output = try options.requiredString("--output")
    let variant = options.string("--variant")
    let backend = try BackendOptions(options, command: command).backend

    var results: [(name: String, tensor: Tensor)] = []
    switch what {
    case "unet":
        let (unet, _) = try UNet2DConditionModel.load(folder: model, backend: backend, variant: variant)
        let unetInputs = UNetInputs(
            sample: try inputs.tensor("sample", on: backend), timestep: try inputs.tensor("timestep", on: backend, floatOnly: false),
            encoderHiddenStates: try inputs.tensor("encoder_hidden_states", on: backend),
            textEmbeds: try inputs.optionalTensor("text_embeds", on: backend),
            timeIds: try inputs.optionalTensor("time_ids", on: backend, floatOnly: false),
            timestepCondition: try inputs.optionalTensor("timestep_cond", on: backend))
        let (sample, features) = try unet.evaluate(unetInputs, keepFeatures: options.has("--features"))
        results.append(("sample", sample))
        for (i, h) in features.down.enumerated() { results.append(("down.\(i)", h)) }
        if let mid = features.mid { results.append(("mid", mid)) }
        for (i, h) in features.up.enumerated() { results.append(("up.\(i)", h)) }
    case "vae-decode":
        let (vae, _) = try AutoencoderKL.load(folder: model, backend: backend, variant: variant)
        results.append(("sample", try vae.decode(inputs.tensor("latents", on: backend))))
    default:
        let (vae, _) = try AutoencoderKL.load(folder: model, backend: backend, variant: variant)
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

/// The tensors of an `--inputs` file, checked by name with errors that name the file.
struct EvalInputs {
    let file: SafeTensorsFile

    init(path: String) throws { file = try SafeTensorsFile(path: path) }

    func optionalTensor(_ name: String, on backend: any ComputeBackend, floatOnly: Bool = true) throws -> Tensor? {
        file.contains(name) ? try tensor(name, on: backend, floatOnly: floatOnly) : nil
    }

    /// The tensor, in f32 when it holds floating-point values (ids and timesteps may stay integers).
    func tensor(_ name: String, on backend: any ComputeBackend, floatOnly: Bool = true) throws -> Tensor {
        guard file.contains(name) else {
            throw PEAError.invalidFile(path: file.path, reason: "missing input tensor '\(name)'")
        }
        var values = try file.tensor(name)
        if floatOnly && !values.dtype.isFloatingPoint {
            throw PEAError.invalidFile(path: file.path, reason: "input '\(name)' is \(values.dtype), expected floating point")
        }
        if values.dtype == .f16 || values.dtype == .bf16 { values = values.converted(to: .f32) }
        return try backend.upload(values)
    }
}
