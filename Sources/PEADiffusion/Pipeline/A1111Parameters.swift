// The generation parameters as A1111 writes them into PNGs: shared by `pea generate`, its jobs and `pea serve`.

/// The generation parameters as AUTOMATIC1111's web UI writes them into a PNG's `parameters` chunk.
public func a1111Parameters(_ request: GenerationRequest, sampler: String, model: String, family: ModelFamily) -> String {
    var text = request.prompt
    if let negative = request.negativePrompt { text += "\nNegative prompt: \(negative)" }
    let modelName = model.split(separator: "/").last.map(String.init) ?? model
    text += "\nSteps: \(request.steps), Sampler: \(sampler), CFG scale: \(request.guidance), Seed: \(request.seed), "
        + "Size: \(request.width)x\(request.height), Model: \(modelName), Model family: \(family.rawValue), Generator: torch CPU (pea)"
    if request.initImage != nil { text += ", Denoising strength: \(request.strength)" }
    return text
}

/// The sampler as A1111 names it (PNDM without its Runge–Kutta warm-up is PLMS).
public func a1111SamplerName(_ name: SchedulerName?, className: String) -> String {
    switch name {
    case .ddim?: return "DDIM"
    case .euler?: return "Euler"
    case .eulerAncestral?: return "Euler a"
    case .dpmpp2M?: return "DPM++ 2M"
    case .dpmpp2MKarras?: return "DPM++ 2M Karras"
    case .pndm?: return "PLMS"
    case nil:
        let names = ["DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
                     "DPMSolverMultistepScheduler": "DPM++ 2M", "PNDMScheduler": "PLMS"]
        return names[className] ?? className
    }
}

